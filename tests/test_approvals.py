"""Tool approvals: a run whose next tool call needs one pauses — journaled, holding no
worker and no admission slot — and a fresh worker goes on with the same run once it is
answered; a denial is a tool result the model sees."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TEST_CONFIG, Daemon, wait_until
from genvisor.errors import GenerationCanceled, InvalidModeConfig, LLMError, NotFound
from genvisor.types import GenerationEvent

ASK = {"approvals": {"run_command": "ask"}}  # the default too; said here, as the tests' config allows commands


def _command(text: str, marker: str = "out.txt") -> dict:
    return {"tool_calls": [{"name": "run_command", "arguments": {"argv": ["sh", "-c", f"echo {text} > {marker}; echo ran"]}}]}


def _start(client, conv: str, workspace: Path, mode_state: dict | None = ASK) -> None:
    workspace.mkdir(parents=True, exist_ok=True)
    client.start_conversation(conv, metadata={"workspace": str(workspace)})
    client.configure_skills(conv, ["read_file", "write_file", "run_command"])
    if mode_state is not None:
        client.configure_mode(conv, "coding", mode_state)


def _paused(client, conv: str, ref: str) -> list:
    """Wait, on the run's own events, for it to ask; then its pending approvals."""
    for event in client.stream_events(conv, ref):
        if event.kind == "approval_requested":
            break
    return client.pending_approvals(conv)


def test_an_approved_call_runs_in_a_fresh_worker_and_the_run_goes_on_as_the_same_run(connect, conv, tmp_path):
    workspace = tmp_path / conv
    with connect() as client:
        _start(client, conv, workspace)
        client.send_user_message(conv, "make out.txt")
        ref = client.generate_assistant_reply(conv, backend_opts={"script": [_command("hello"), {"text": "made it"}]})
        note = client.next_notification(timeout_ms=10_000)  # pushed to the owner, which asked for no events
        assert isinstance(note, GenerationEvent) and note.kind == "approval_requested" and note.tool_call.name == "run_command"
        [request] = client.pending_approvals(conv)
        assert (request.ref, request.call_id, request.tool) == (ref, note.tool_call.id, "run_command")
        assert '"echo hello > out.txt; echo ran"' in request.arguments
        run = client.conversation(conv).state.active_run
        assert run is not None and run.status == "awaiting_approval"
        # Its worker is let go (reaped, then its slot freed): no process, no slot, while it waits.
        wait_until(lambda: client.status().active_runs == 0, 20, "the paused run's slot to be freed")
        assert not (workspace / "out.txt").exists()  # nothing of the batch ran
        client.resolve_approval(conv, ref, request.call_id, approve=True)
        result = client.await_generation(conv, ref)
        assert result.text == "made it"
        assert (workspace / "out.txt").read_text() == "hello\n"
        assert client.pending_approvals(conv) == []
        state = client.conversation(conv).state
        assert [r.run_id for r in state.run_history[:1]] == [run.run_id] and state.run_history[0].status == "completed"
        events = list(client.stream_events(conv, ref))
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        assert [e.kind for e in events if e.kind.startswith("approval")] == ["approval_requested", "approval_resolved"]
        [tool] = client.conversation_messages(conv, roles=["tool"])
        assert tool.content.startswith("exit code 0") and "ran" in tool.content


def test_a_denied_call_is_a_tool_result_the_model_sees_and_the_command_never_runs(connect, conv, tmp_path):
    workspace = tmp_path / conv
    with connect() as client:
        _start(client, conv, workspace)
        client.send_user_message(conv, "make out.txt")
        ref = client.generate_assistant_reply(conv, backend_opts={"script": [_command("no"), {"text": "understood"}]})
        [request] = _paused(client, conv, ref)
        client.resolve_approval(conv, ref, request.call_id, approve=False, note="not on a Friday")
        assert client.await_generation(conv, ref).text == "understood"
        assert not (workspace / "out.txt").exists()
        [tool] = client.conversation_messages(conv, roles=["tool"])
        assert tool.content == "the user denied this run_command call: not on a Friday" and tool.metadata["is_error"]
        with pytest.raises(NotFound):  # answered already: nothing waits any more
            client.resolve_approval(conv, ref, request.call_id, approve=True)


def test_allow_ask_and_deny_per_tool(connect, conv, tmp_path):
    workspace = tmp_path / conv
    with connect() as client:
        _start(client, conv, workspace, {"approvals": {"write_file": "deny", "run_command": "allow"}})
        for bad in ({"run_command": "maybe"}, {"launch_rockets": "allow"}, ["run_command"]):
            with pytest.raises(InvalidModeConfig):
                client.configure_mode(conv, "coding", {"approvals": bad})
        write = {"tool_calls": [{"name": "write_file", "arguments": {"path": "w.txt", "content": "x"}}]}
        _, result = client.send_and_generate(conv, "go", generation_opts={"backend_opts": {"script": [write, _command("yes"), {"text": "ok"}]}})
        assert result.text == "ok"
        assert not (workspace / "w.txt").exists() and (workspace / "out.txt").read_text() == "yes\n"
        tools = client.conversation_messages(conv, roles=["tool"])
        assert "approval policy is deny" in tools[0].content and tools[0].metadata["is_error"]


def test_a_paused_run_is_canceled_once_and_its_earlier_changes_are_undone(connect, conv, tmp_path):
    workspace = tmp_path / conv
    with connect() as client:
        _start(client, conv, workspace)
        (workspace / "notes.txt").write_text("ORIGINAL\n")
        write = {"tool_calls": [{"name": "write_file", "arguments": {"path": "notes.txt", "content": "CHANGED\n"}}]}
        client.send_user_message(conv, "change, then ask")
        ref = client.generate_assistant_reply(conv, backend_opts={"script": [write, _command("x"), {"text": "never"}]})
        _paused(client, conv, ref)
        assert (workspace / "notes.txt").read_text() == "CHANGED\n"  # the first batch ran before the pause
        client.cancel_generation(conv, "changed my mind")
        with pytest.raises(GenerationCanceled) as raised:
            client.await_generation(conv, ref)
        assert raised.value.reason == "changed my mind"
        assert client.turn_changes(conv, ref).workspace == "restored"
        assert (workspace / "notes.txt").read_text() == "ORIGINAL\n"
        assert client.pending_approvals(conv) == []
        with pytest.raises(NotFound):
            client.resolve_approval(conv, ref, "call_1_0", approve=True)
        [terminal] = [e for e in client.stream_events(conv, ref) if e.terminal]
        assert terminal.kind == "canceled"


def test_an_unanswered_approval_times_out_and_the_deadline_does_not_tick_while_paused(connect, conv, tmp_path):
    workspace = tmp_path / conv
    with connect() as client:
        _start(client, conv, workspace)
        client.send_user_message(conv, "ask, and wait")
        ref = client.generate_assistant_reply(conv, approval_timeout_ms=100, backend_opts={"script": [_command("x"), {"text": "no"}]})
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        assert raised.value.category == "timeout" and raised.value.details["reason"] == "approval_timeout"
        # A run with a 400 ms deadline, paused for longer than that (while a 600 ms turn of
        # another conversation runs to its end), still completes: only its workers' time counts.
        ref = client.generate_assistant_reply(conv, timeout_ms=400, backend_opts={"script": [_command("late"), {"text": "in time"}]})
        [request] = _paused(client, conv, ref)
        began = time.monotonic()
        client.send_and_generate(conv + "-other", "meanwhile", generation_opts={"backend_opts": {"delay_ms": 600}})
        assert time.monotonic() - began >= 0.6
        client.resolve_approval(conv, ref, request.call_id, approve=True)
        assert client.await_generation(conv, ref).text == "in time"


def test_stopping_the_conversation_ends_a_paused_run(connect, conv, tmp_path):
    with connect() as client:
        _start(client, conv, tmp_path / conv)
        client.send_user_message(conv, "ask")
        ref = client.generate_assistant_reply(conv, backend_opts={"script": [_command("x"), {"text": "no"}]})
        _paused(client, conv, ref)
        client.stop_conversation(conv)
        with pytest.raises(GenerationCanceled) as raised:
            client.await_generation(conv, ref)
        assert raised.value.reason == "conversation_stopped"


@pytest.fixture
def asking(tmp_path):
    """A daemon on the default approvals (the tests' config allows commands)."""
    d = Daemon(tmp_path, TEST_CONFIG.replace('[approvals]\nrun_command = "allow"\n', "")).start()
    yield d
    assert d.stop() == 0, d.log()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_pause_survives_a_daemon_restart_and_is_answerable_after_it(asking, conv, tmp_path, how):
    workspace = tmp_path / "ws"
    with asking.client() as client:
        _start(client, conv, workspace, mode_state=None)  # the default policy: run_command asks
        client.send_user_message(conv, "ask")
        ref = client.generate_assistant_reply(conv, backend_opts={"script": [_command("after"), {"text": "went on"}]})
        [request] = _paused(client, conv, ref)
    if how == "sigterm":
        assert asking.stop() == 0  # a paused run holds no process: a stop leaves it paused
    else:
        asking.kill()
    asking.start()
    with asking.client() as client:
        assert client.pending_approvals(conv) == [request]
        assert client.conversation(conv).state.active_run.status == "awaiting_approval"
        client.resolve_approval(conv, ref, request.call_id, approve=True)
        assert client.await_generation(conv, ref).text == "went on"
        assert (workspace / "out.txt").read_text() == "after\n"
        events = list(client.stream_events(conv, ref))
        assert [e.seq for e in events] == list(range(1, len(events) + 1)) and events[-1].kind == "completed"


def test_paused_runs_hold_no_worker(asking, tmp_path):
    """(1 000 of them, and the memory each costs, are the bench's: `python -m bench.memory`.)"""
    runs = 30  # enough to see no process per run
    with asking.client() as client:
        refs = {}
        for n in range(runs):
            conv = f"p{n}"
            _start(client, conv, tmp_path / conv, mode_state=None)
            client.send_user_message(conv, "ask")
            refs[conv] = client.generate_assistant_reply(conv, backend_opts={"script": [_command("x"), {"text": "ok"}]})
        wait_until(lambda: all(client.pending_approvals(c) for c in refs), 60, "every run to pause")
        wait_until(lambda: client.status().active_runs == 0, 60, "the paused runs' slots to be freed")
        # The zygote and its spares (waiting for runs), and nothing for the paused ones.
        assert len(asking.descendants()) <= 1 + client.status().spare_workers
        for conv, ref in refs.items():
            client.resolve_approval(conv, ref, client.pending_approvals(conv)[0].call_id, approve=True)
        assert {client.await_generation(c, r).text for c, r in refs.items()} == {"ok"}


def test_the_cli_lists_and_answers_approvals(asking, conv, tmp_path):
    workspace = tmp_path / "ws"
    base = [sys.executable, "-m", "genvisor", "--endpoint", asking.endpoint]
    with asking.client() as client:
        _start(client, conv, workspace, mode_state=None)
        client.send_user_message(conv, "ask")
        ref = client.generate_assistant_reply(conv, backend_opts={"script": [_command("a"), _command("b", "b.txt"), {"text": "done"}]})
        [first] = _paused(client, conv, ref)
        listed = subprocess.run([*base, "approvals", conv], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0 and first.call_id in listed.stdout and "run_command" in listed.stdout
        assert subprocess.run([*base, "approve", conv, ref, first.call_id], capture_output=True, timeout=60).returncode == 0
        wait_until(lambda: client.pending_approvals(conv) and client.pending_approvals(conv)[0].call_id != first.call_id, 30,
                   "the second call to ask")
        second = client.pending_approvals(conv)[0]
        denied = subprocess.run([*base, "deny", conv, ref, second.call_id, "--note", "enough"], capture_output=True, text=True, timeout=60)
        assert denied.returncode == 0, denied.stderr
        assert client.await_generation(conv, ref).text == "done"
        assert (workspace / "out.txt").exists() and not (workspace / "b.txt").exists()
        gone = subprocess.run([*base, "approve", conv, ref, second.call_id], capture_output=True, text=True, timeout=60)
        assert gone.returncode == 1 and "no approval" in gone.stderr
