"""The `planning` mode end to end, on both executors: a goal in, a validated plan out
(the latest and the history readable); a reply that does not validate is fed back
with what is wrong, a bounded number of times; only read-only tools are offered."""

from __future__ import annotations

import json

import pytest

from genvisor.errors import InvalidModeConfig, LLMError
from genvisor.modes.planning import parse_plan

PLAN = {"goal": "ship the CLI", "phases": [
    {"id": "P1", "title": "Design", "tasks": [
        {"id": "P1.T1", "title": "List the verbs", "acceptance": ["every verb has a line in README"]}]},
    {"id": "P2", "title": "Build", "tasks": [
        {"id": "P2.T1", "title": "Write the parser", "status": "in_progress", "acceptance": ["`genvisor --help` lists them"]},
        {"id": "P2.T2", "title": "Test it", "acceptance": ["make test passes", "a test per verb"]}]},
]}


def _plan_turn(client, conv, *replies, **mode_state):
    client.configure_mode(conv, "planning", mode_state or None)
    client.send_user_message(conv, "plan: ship the CLI")
    script = [r if isinstance(r, dict) and "tool_calls" in r else {"text": r if isinstance(r, str) else json.dumps(r)}
              for r in replies]
    return client.generate_assistant_reply(conv, backend_opts={"script": script})


def test_a_goal_becomes_a_validated_plan_that_can_be_read_back(connect, conv):
    with connect() as client:
        ref = _plan_turn(client, conv, "```json\n" + json.dumps(PLAN) + "\n```")
        result = client.await_generation(conv, ref)
        record = client.plan(conv)
        assert record is not None and record.ref == ref
        assert record.plan.goal == "ship the CLI" and [p.id for p in record.plan.phases] == ["P1", "P2"]
        assert record.plan.phases[1].tasks[0].status == "in_progress" and record.plan.phases[0].tasks[0].status == "todo"
        assert result.text == record.plan.as_text() and "[~] P2.T1 Write the parser" in result.text
        assert client.conversation_messages(conv)[-1].content == result.text
        assert client.derived_state(conv).run_history[0].mode == "planning"


def test_a_plan_that_does_not_validate_is_fed_back_then_accepted(connect, conv):
    bad = {**PLAN, "phases": [{"id": "P1", "title": "Design", "tasks": []}]}
    with connect() as client:
        ref = _plan_turn(client, conv, "here is my plan: do it", bad, PLAN)
        client.await_generation(conv, ref)
        assert client.plan(conv).plan == parse_plan(json.dumps(PLAN))
        # The rejections went to the model, not to the journal: one assistant message, the plan.
        assert [m.role for m in client.conversation_messages(conv)] == ["user", "assistant"]


def test_a_model_that_never_gives_a_valid_plan_fails_the_run_with_a_typed_error(connect, conv):
    duplicate_ids = {**PLAN, "phases": [PLAN["phases"][0], {**PLAN["phases"][0], "title": "again"}]}
    with connect() as client:
        ref = _plan_turn(client, conv, "no json", duplicate_ids, max_retries=1)
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        assert raised.value.category == "provider" and raised.value.details["reason"] == "invalid_plan"
        assert "ids must be unique; repeated: P1, P1.T1" in raised.value.message
        assert client.plan(conv) is None and client.plans(conv) == []


def test_planning_offers_only_read_only_tools(connect, conv, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "notes.txt").write_text("the verbs: send, await\n")
    with connect() as client:
        client.start_conversation(conv, metadata={"workspace": str(workspace)})
        client.configure_skills(conv, ["read_file", "write_file", "run_command"])
        calls = {"tool_calls": [{"name": "read_file", "arguments": {"path": "notes.txt"}},
                                {"name": "write_file", "arguments": {"path": "notes.txt", "content": "gone"}}]}
        ref = _plan_turn(client, conv, calls, PLAN)
        result = client.await_generation(conv, ref)
        tools = [m for m in client.conversation_messages(conv) if m.role == "tool"]
    assert [t.metadata["is_error"] for t in tools] == [False, True] and "send, await" in tools[0].content
    assert "not enabled" in tools[1].content
    assert (workspace / "notes.txt").read_text() == "the verbs: send, await\n"
    assert result.changes.files == []


def test_plans_keep_their_history_and_the_mode_switches_back(connect, conv):
    second = {**PLAN, "goal": "ship it faster"}
    with connect() as client:
        client.await_generation(conv, _plan_turn(client, conv, PLAN))
        client.send_user_message(conv, "faster")
        client.await_generation(conv, client.generate_assistant_reply(conv, backend_opts={"reply": json.dumps(second)}))
        assert [r.plan.goal for r in client.plans(conv)] == ["ship the CLI", "ship it faster"]
        assert client.plan(conv).plan.goal == "ship it faster"
        client.configure_mode(conv, "coding", reason="done planning")
        _, result = client.send_and_generate(conv, "now build it")
        assert result.text == "now build it" and len(client.plans(conv)) == 2


@pytest.mark.parametrize("mode_state", [{"max_retries": 9}, {"max_retries": "2"}, {"max_tool_calls": 3}, {"max_steps": 0}])
def test_a_bad_planning_configuration_is_refused(connect, conv, mode_state):
    with connect() as client, pytest.raises(InvalidModeConfig) as raised:
        client.configure_mode(conv, "planning", mode_state)
    assert raised.value.mode == "planning" and raised.value.diagnostics


def test_parse_plan_says_what_is_wrong():
    with pytest.raises(ValueError, match="not a JSON object"):
        parse_plan("plan: do it")
    with pytest.raises(ValueError, match="acceptance"):
        parse_plan(json.dumps({"goal": "g", "phases": [{"id": "P", "title": "t", "tasks": [{"id": "T", "title": "t"}]}]}))
    with pytest.raises(ValueError, match="status"):
        parse_plan(json.dumps({"goal": "g", "phases": [{"id": "P", "title": "t", "tasks": [
            {"id": "T", "title": "t", "acceptance": ["a"], "status": "maybe"}]}]}))
    with pytest.raises(ValueError, match="goal"):
        parse_plan(json.dumps({"goal": "   ", "phases": PLAN["phases"]}))


def test_the_cli_prints_the_latest_plan_or_says_how_to_make_one(shared_daemon, conv):
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "genvisor", "--endpoint", shared_daemon.endpoint, *args],
                              capture_output=True, text=True, timeout=60)

    with shared_daemon.client() as client:
        client.start_conversation(conv)
        assert cli("plan", conv).stdout.startswith("no plan yet: `genvisor mode ")
        ref = _plan_turn(client, conv, PLAN)
        client.await_generation(conv, ref)
    shown = cli("plan", conv)
    assert shown.returncode == 0 and shown.stdout.startswith(f"# {ref} (") and "[ ] P2.T2 Test it\n      - make test passes" in shown.stdout
    assert json.loads(cli("--json", "plan", conv).stdout)["plan"]["goal"] == "ship the CLI"
    assert len(json.loads(cli("--json", "plan", conv, "--history").stdout)) == 1
