"""The coding step graph and the conversation fold, without processes."""

from __future__ import annotations

import pytest

from genvisor.modes.assemble import build_run_spec
from genvisor.modes.coding import CodingRun
from genvisor.modes.conversation import JournalEntry, fold
from genvisor.modes.llm import BackendConfig, LLMReply, RunDefaults
from genvisor.modes.protocol import (
    AssemblyRequest,
    CallLLM,
    Commit,
    Fail,
    LLMReplied,
    ProtocolViolation,
    RunTools,
    Start,
    ToolsFinished,
)
from genvisor.types import DerivedState, ToolCall, ToolResult

SCRIPTED = BackendConfig("scripted", "scripted", model="scripted")
DEFAULTS = RunDefaults(backend="scripted", timeout_ms=60_000, stream=False, backends={"scripted": SCRIPTED})


def _entry(seq, kind="message", **fields):
    return JournalEntry(entry_id=f"e{seq}", seq=seq, kind=kind, at=float(seq), **fields)


def _state_with(*messages):
    return fold([_entry(i + 1, role=role, content=content) for i, (role, content) in enumerate(messages)])


def _spec(state, **options):
    return build_run_spec(AssemblyRequest(ref="gen_1", run_id="run_1", conversation_id="c", state=state, options=options, defaults=DEFAULTS))


def test_a_plain_answer_is_one_llm_call_then_commit():
    run = CodingRun(_spec(_state_with(("user", "hi"))))
    call = run.feed(Start())
    assert isinstance(call, CallLLM) and [m.content for m in call.request.messages] == ["hi"]
    commit = run.feed(LLMReplied(LLMReply(text="hello")))
    assert isinstance(commit, Commit)
    assert [m.role for m in commit.outcome.messages] == ["assistant"]
    assert commit.outcome.messages[-1].metadata["run_id"] == "run_1"


def test_tool_calls_are_fed_back_and_committed_with_the_reply():
    run = CodingRun(_spec(_state_with(("user", "read it"))))
    run.feed(Start())
    tools = run.feed(LLMReplied(LLMReply(tool_calls=[ToolCall("t1", "read_file", "{}")], finish_reason="tool_calls")))
    assert isinstance(tools, RunTools)
    again = run.feed(ToolsFinished([ToolResult("t1", "read_file", "contents")]))
    assert isinstance(again, CallLLM) and [m.role for m in again.request.messages] == ["user", "assistant", "tool"]
    commit = run.feed(LLMReplied(LLMReply(text="done")))
    assert [m.role for m in commit.outcome.messages] == ["assistant", "tool", "assistant"]


def test_the_step_budget_ends_a_tool_loop():
    run = CodingRun(_spec(_state_with(("user", "loop"))))
    directive = run.feed(Start())
    for _ in range(run.spec.max_steps):
        directive = run.feed(LLMReplied(LLMReply(tool_calls=[ToolCall("t", "x", "{}")])))
        if isinstance(directive, Fail):
            break
        run.feed(ToolsFinished([ToolResult("t", "x", "r")]))
    assert isinstance(directive, Fail) and "budget" in directive.error.message


def test_the_tool_call_budget_ends_a_run():
    configured = _entry(2, kind="note", event="mode_configured", data={"mode": "coding", "mode_state": {"max_tool_calls": 2}})
    state = fold([_entry(1, role="user", content="go"), configured])
    run = CodingRun(_spec(state))
    run.feed(Start())
    run.feed(LLMReplied(LLMReply(tool_calls=[ToolCall("a", "x", "{}"), ToolCall("b", "x", "{}")])))
    run.feed(ToolsFinished([ToolResult("a", "x", "r"), ToolResult("b", "x", "r")]))
    fail = run.feed(LLMReplied(LLMReply(tool_calls=[ToolCall("c", "x", "{}")])))
    assert isinstance(fail, Fail) and "tool-call budget of 2" in fail.error.message


def test_the_manifest_follows_the_skills():
    state = fold([_entry(1, role="user", content="go")])
    assert [t.name for t in _spec(state).request.tools] == ["read_file", "list_dir", "search_text", "write_file", "edit_file"]
    state = fold([_entry(1, role="user", content="go"), _entry(2, kind="note", event="skills_configured", data={"skills": ["run_command"]})])
    assert [t.name for t in _spec(state).request.tools] == ["run_command"]


def test_an_input_the_step_does_not_accept_is_refused():
    run = CodingRun(_spec(_state_with(("user", "hi"))))
    with pytest.raises(ProtocolViolation):
        run.feed(ToolsFinished([]))
    run.feed(Start())
    with pytest.raises(ProtocolViolation):
        run.feed(Start())


@pytest.mark.parametrize(
    ("state", "options", "needle"),
    [
        (_state_with(("user", "hi")), {"max_messages": "x"}, "max_messages"),
        (_state_with(("user", "hi")), {"backend": "nope"}, "unknown backend"),
        (DerivedState(), {}, "context is empty"),
    ],
)
def test_bad_options_become_a_config_failure_of_the_run(state, options, needle):
    fail = CodingRun(_spec(state, **options)).feed(Start())
    assert isinstance(fail, Fail) and fail.error.category == "config" and needle in fail.error.message


def test_precedence_call_over_conversation_over_backend_over_defaults():
    state = fold([_entry(1, role="user", content="hi"), _entry(2, kind="note", event="llm_configured", data={"model": "conv-model"})])
    assert _spec(state).request.model == "conv-model"
    assert _spec(state, model="call-model").request.model == "call-model"
    assert _spec(_state_with(("user", "hi"))).request.model == "scripted"
    assert _spec(state).request.timeout_ms == 60_000


def test_context_window_keeps_the_last_n_and_drops_system_and_tool_unless_asked():
    state = _state_with(("system", "sys"), ("user", "a"), ("assistant", "b"), ("tool", "t"), ("user", "  "), ("user", "c"))
    assert [m.content for m in _spec(state).request.messages] == ["a", "b", "c"]
    assert [m.content for m in _spec(state, max_messages=2).request.messages] == ["b", "c"]
    assert [m.content for m in _spec(state, include_system=True, include_tool=True).request.messages] == ["sys", "a", "b", "t", "c"]


def test_status_transitions_and_sticky_cancel():
    entries = [
        _entry(1, role="user", content="a"),
        _entry(2, kind="note", event="cancel_requested", data={"reason": "r"}),
        _entry(3, role="user", content="b"),
        _entry(4, role="assistant", content="c"),
    ]
    states = [fold(entries[:n]) for n in range(5)]
    assert [s.status for s in states] == ["idle", "pending_llm", "canceled", "pending_llm", "responding"]
    assert states[3].cancel_requested and states[3].cancel_reason == "r" and states[3].turn == 2


def test_llm_config_merges_and_options_accumulate():
    state = fold([
        _entry(1, kind="note", event="llm_configured", data={"backend": "a", "model": "m", "options": {"x": {"y": 1}}}),
        _entry(2, kind="note", event="llm_configured", data={"model": None, "options": {"x": {"z": 2}}}),
    ])
    assert (state.llm.backend, state.llm.model, state.llm.options) == ("a", "m", {"x": {"y": 1, "z": 2}})


async def test_the_loop_uses_only_the_capabilities_it_is_handed(tmp_path):
    import msgspec

    from genvisor.modes.llm import RunSucceeded
    from genvisor.modes.loop import Capabilities, drive
    from genvisor.supervisor.inprocess import InProcessHost

    calls = []

    async def backend(request, call_index, on_delta, host):
        calls.append(("llm", call_index))
        if call_index == 0:
            return LLMReply(tool_calls=[ToolCall("t1", "read_file", '{"path": "x"}')], finish_reason="tool_calls")
        return LLMReply(text="seen: " + request.messages[-1].content)

    async def call_tool(workspace, call, enabled):
        calls.append(("tool", call.name))
        return ToolResult(call.id, call.name, "the tool's answer")

    spec = msgspec.structs.replace(_spec(_state_with(("user", "look"))), workspace=str(tmp_path))
    events = []

    async def emit(event):
        events.append(event.kind)

    outcome = await drive(spec, emit, InProcessHost(), Capabilities(backends={"scripted": backend}, call_tool=call_tool))
    assert isinstance(outcome, RunSucceeded) and outcome.result.text == "seen: the tool's answer"
    assert calls == [("llm", 0), ("tool", "read_file"), ("llm", 1)]
    # Every run sends all its events (the daemon keeps them for stream_events); the
    # terminal one is the daemon's.
    assert events == ["started", "step", "tool_call", "tool_result", "step"]
