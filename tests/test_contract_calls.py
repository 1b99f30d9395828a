"""CONTRACT §1–§5, call by call, on both executors (see the `connect` fixture)."""

from __future__ import annotations

import pytest

from genvisor.errors import (
    AlreadyStarted,
    BadRequest,
    EmptyMessage,
    ForceCancelReasonRequired,
    GenerationCanceled,
    GenerationInProgress,
    InvalidLocator,
    InvalidModeConfig,
    InvalidOptions,
    LLMError,
    NoGenerationInProgress,
    NotFound,
    RunInProgress,
    UnsupportedMode,
)
from genvisor.ipc.frames import MAX_FRAME_BYTES
from genvisor.types import GenerationCanceled as CanceledNote

SLOW = {"backend_opts": {"delay_ms": 60_000}}


@pytest.fixture
def client(connect):
    with connect() as c:
        yield c


# ---- §1 locators ----------------------------------------------------------------------


def test_an_id_unscoped_and_under_two_projects_names_three_conversations(client, conv):
    for loc, text in ((conv, "plain"), (("p1", conv), "one"), (("p2", conv), "two")):
        client.send_user_message(loc, text)
    assert [client.conversation_messages(loc)[0].content for loc in (conv, ("p1", conv), ("p2", conv))] == ["plain", "one", "two"]
    assert client.conversation(("p1", conv)).metadata["project_id"] == "p1"
    assert client.conversation(("p1", conv)).project_id == "p1"


def test_ids_are_used_as_given_not_stripped(client, conv):
    client.send_user_message(" " + conv, "spaced")
    with pytest.raises(NotFound):
        client.conversation(conv)


@pytest.mark.parametrize("loc", ["", "  ", ("p", " "), (" ", "c"), ("a",), ("a", "b", "c"), 5, None, ("p", 5)])
def test_malformed_locators_are_invalid(client, loc):
    with pytest.raises(InvalidLocator):
        client.send_user_message(loc, "hi")
    with pytest.raises(InvalidLocator):
        client.conversation(loc)


FETCH_CALLS = {
    "conversation": lambda c, loc: c.conversation(loc),
    "derived_state": lambda c, loc: c.derived_state(loc),
    "conversation_messages": lambda c, loc: c.conversation_messages(loc),
    "conversation_llm_context": lambda c, loc: c.conversation_llm_context(loc),
    "conversation_timeline": lambda c, loc: c.conversation_timeline(loc),
    "conversation_thread_entries": lambda c, loc: c.conversation_thread_entries(loc),
    "mode": lambda c, loc: c.mode(loc),
    "cancel_generation": lambda c, loc: c.cancel_generation(loc),
    "stop_conversation": lambda c, loc: c.stop_conversation(loc),
}


@pytest.mark.parametrize("call", list(FETCH_CALLS))
def test_fetch_calls_never_create(client, conv, call):
    with pytest.raises(NotFound):
        FETCH_CALLS[call](client, conv)
    with pytest.raises(NotFound):
        client.conversation(conv)


ENSURE_CALLS = {
    "send_user_message": lambda c, loc: c.send_user_message(loc, "hi"),
    "record_assistant_message": lambda c, loc: c.record_assistant_message(loc, "hi"),
    "configure_llm": lambda c, loc: c.configure_llm(loc, "scripted"),
    "configure_skills": lambda c, loc: c.configure_skills(loc, ["read"]),
    "configure_mode": lambda c, loc: c.configure_mode(loc, "coding"),
    "generate_assistant_reply": lambda c, loc: c.generate_assistant_reply(loc),
    "send_and_generate": lambda c, loc: c.send_and_generate(loc, "hi"),
}


@pytest.mark.parametrize("call", list(ENSURE_CALLS))
def test_ensure_calls_create_on_first_use(client, conv, call):
    try:
        ENSURE_CALLS[call](client, conv)
    except LLMError:
        pass  # generate on an empty conversation: a config failure, but it exists now
    assert client.conversation(conv).id == conv


def test_start_and_ensure_conversation(client, conv):
    started = client.start_conversation(conv, project_id="proj", metadata={"owner": "ana"})
    assert started.metadata == {"owner": "ana", "project_id": "proj"} and started.state.status == "idle"
    with pytest.raises(AlreadyStarted):
        client.start_conversation(conv, project_id="proj")
    assert client.ensure_conversation(conv, project_id="proj")[1] == "existing"
    assert client.ensure_conversation(conv)[1] == "started"
    with pytest.raises(InvalidOptions) as raised:
        client.start_conversation(conv + "x", metadata=["not", "a", "mapping"])
    assert raised.value.field == "metadata"
    with pytest.raises(NotFound):
        client.conversation(conv + "x")


# ---- §3 conversation calls --------------------------------------------------------------


def test_status_turn_and_sticky_cancel(client, conv):
    assert client.send_user_message(conv, "a").state.status == "pending_llm"
    assert client.record_assistant_message(conv, "b").state.status == "responding"
    client.send_user_message(conv, "c")
    client.generate_assistant_reply(conv, **SLOW)
    client.cancel_generation(conv, reason="why")
    state = client.send_user_message(conv, "d").state
    assert (state.status, state.turn, state.cancel_requested, state.cancel_reason, state.last_user_message) == ("pending_llm", 3, True, "why", "d")


def test_blank_messages_are_refused_and_change_nothing(client, conv):
    client.send_user_message(conv, "first")
    for call in (client.send_user_message, client.record_assistant_message):
        with pytest.raises(EmptyMessage):
            call(conv, "  \n")
    assert len(client.conversation_thread_entries(conv)) == 1


def test_configure_llm_merges_and_options_accumulate(client, conv):
    client.configure_llm(conv, "scripted", model="m1", options={"a": {"x": 1}})
    state = client.configure_llm(conv, None, provider="p", options={"a": {"y": 2}, "b": 3}).state
    assert (state.llm.backend, state.llm.provider, state.llm.model) == ("scripted", "p", "m1")
    assert state.llm.options == {"a": {"x": 1, "y": 2}, "b": 3}


def test_configure_skills_normalises(client, conv):
    state = client.configure_skills(conv, [" read ", "", "write", 7, None, "read", "  ", "run"]).state
    assert state.skills == ["read", "write", "run"]
    assert client.configure_skills(conv, []).state.skills == []


def test_messages_filter_by_role_then_keep_the_last_n(client, conv):
    for role, text in (("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2")):
        (client.send_user_message if role == "user" else client.record_assistant_message)(conv, text)
    assert [m.content for m in client.conversation_messages(conv, roles=["user"])] == ["u1", "u2"]
    assert [m.content for m in client.conversation_messages(conv, max_messages=3)] == ["a1", "u2", "a2"]
    assert [m.content for m in client.conversation_messages(conv, max_messages=1, roles=["user", "nobody"])] == ["u2"]
    assert client.conversation_messages(conv, roles=["nobody"]) == []
    assert [m.content for m in client.conversation_llm_context(conv, max_messages=2)] == ["u2", "a2"]
    seqs = [m.seq for m in client.conversation_messages(conv)]
    assert seqs == sorted(seqs)


def test_timeline_and_thread_entries_record_every_change_in_order(client, conv):
    client.send_user_message(conv, "hi")
    client.configure_llm(conv, "scripted")
    client.send_and_generate(conv, "again")
    entries = client.conversation_thread_entries(conv)
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    assert [e.event or e.role for e in entries] == ["user", "llm_configured", "user", "run_started", "assistant", "run_finished"]
    timeline = client.conversation_timeline(conv)
    assert [(t.kind, t.seq) for t in timeline] == [("message" if e.kind == "message" else "event", e.seq) for e in entries]


def test_stop_conversation_cancels_the_run_first(client, conv):
    client.send_user_message(conv, "hi")
    ref = client.generate_assistant_reply(conv, **SLOW)
    assert client.stop_conversation(conv) is None
    assert client.next_notification(timeout_ms=5_000) == CanceledNote(ref, "conversation_stopped")
    with pytest.raises(GenerationCanceled) as raised:
        client.await_generation(conv, ref)
    assert raised.value.reason == "conversation_stopped"


# ---- §4 generation calls ----------------------------------------------------------------


def test_cancel_generation_postconditions(client, conv):
    client.send_user_message(conv, "hi")
    with pytest.raises(NoGenerationInProgress):
        client.cancel_generation(conv)
    ref = client.generate_assistant_reply(conv, **SLOW)
    client.cancel_generation(conv, reason="enough")
    state = client.derived_state(conv)
    assert (state.status, state.cancel_reason, state.active_run, state.run_history[0].status) == ("canceled", "enough", None, "canceled")
    assert [m.role for m in state.messages] == ["user"]
    client.generate_assistant_reply(conv, backend_opts={"reply": "guard is down"})  # no GenerationInProgress
    with pytest.raises(GenerationCanceled):
        client.await_generation(conv, ref)


def test_a_timeout_cancel_never_cancels_a_newer_generation(connect, conv):
    with connect() as first, connect() as second:
        first.send_user_message(conv, "hi")
        old = first.generate_assistant_reply(conv, backend_opts={"reply": "old"})
        first.await_generation(conv, old)
        new = first.generate_assistant_reply(conv, backend_opts={"delay_ms": 300, "reply": "new"})
        # Awaiting the old, finished ref returns at once and cancels nothing.
        assert second.await_generation(conv, old, timeout_ms=0).text == "old"
        assert second.await_generation(conv, new).text == "new"


def test_send_and_generate_stops_at_a_rejected_send(client, conv):
    client.send_user_message(conv, "hi")
    client.generate_assistant_reply(conv, **SLOW)
    with pytest.raises(GenerationInProgress):
        client.send_and_generate(conv, "not recorded")
    assert [m.content for m in client.conversation_messages(conv)] == ["hi"]
    client.cancel_generation(conv)


def test_metadata_on_the_assistant_message(client, conv):
    _, result = client.send_and_generate(
        conv, "hi", generation_opts={"request_id": "req-1", "record_metadata": {"tag": "x", "backend": "overridden"}}
    )
    metadata = client.conversation_messages(conv)[-1].metadata
    assert result.request_id == "req-1"
    assert list(metadata)[:8] == ["request_id", "backend", "provider", "model", "finish_reason", "usage", "llm_metadata", "run_id"]
    assert metadata["request_id"] == "req-1" and metadata["tag"] == "x" and metadata["backend"] == "overridden"


# ---- §5 modes ---------------------------------------------------------------------------


def test_supported_modes_lists_coding_first(client):
    modes = client.supported_modes()
    assert modes[0].id == "coding" and modes[0].stability == "stable" and "max_steps" in modes[0].optional_options


def test_mode_switch_rejections_are_journaled(client, conv):
    client.send_user_message(conv, "hi")
    with pytest.raises(UnsupportedMode) as unsupported:
        client.configure_mode(conv, "poetry")
    assert unsupported.value.supported[0] == "coding"
    with pytest.raises(InvalidModeConfig) as invalid:
        client.configure_mode(conv, "coding", {"max_steps": "lots", "colour": "red"})
    assert {(d.code, d.path) for d in invalid.value.diagnostics} == {("invalid_type", "/max_steps"), ("unknown_option", "/colour")}
    with pytest.raises(InvalidModeConfig) as not_a_mapping:
        client.configure_mode(conv, "coding", ["max_steps", 3])
    assert not_a_mapping.value.diagnostics[0].code == "invalid_type"
    events = [e.event for e in client.conversation_thread_entries(conv) if e.kind == "note"]
    assert events == ["mode_switch_rejected"] * 3
    assert client.mode(conv) == "coding"


def test_mode_state_configures_the_run(client, conv):
    client.configure_mode(conv, "coding", {"system_prompt": "Be brief."})
    assert client.derived_state(conv).mode_state == {"system_prompt": "Be brief."}
    client.send_user_message(conv, "hi")
    # The scripted backend echoes the last user message; the system prompt is in the context.
    assert client.send_and_generate(conv, "again")[1].text == "again"


def test_configure_mode_during_a_run_needs_force_and_a_reason(client, conv):
    client.send_user_message(conv, "hi")
    ref = client.generate_assistant_reply(conv, **SLOW)
    with pytest.raises(RunInProgress):
        client.configure_mode(conv, "coding", {"max_steps": 3})
    with pytest.raises(ForceCancelReasonRequired):
        client.configure_mode(conv, "coding", {"max_steps": 3}, force=True, cancel_reason="  ")
    state = client.configure_mode(conv, "coding", {"max_steps": 3}, force=True, cancel_reason="switching").state
    assert state.mode_state == {"max_steps": 3} and state.cancel_reason == "switching" and state.active_run is None
    with pytest.raises(GenerationCanceled) as raised:
        client.await_generation(conv, ref)
    assert raised.value.reason == "switching"
    notes = [e.event for e in client.conversation_thread_entries(conv) if e.kind == "note"]
    assert notes.count("mode_switch_rejected") == 2 and notes[-1] == "mode_configured"


# ---- bad input changes nothing ----------------------------------------------------------

BAD_CALLS = {
    "content_not_str": (lambda c, loc: c.send_user_message(loc, 123), BadRequest),
    "assistant_content_not_str": (lambda c, loc: c.record_assistant_message(loc, ["x"]), BadRequest),
    "metadata_not_mapping": (lambda c, loc: c.send_user_message(loc, "x", metadata="m"), InvalidOptions),
    "huge_content": (lambda c, loc: c.send_user_message(loc, "x" * (MAX_FRAME_BYTES + 1)), BadRequest),
    "llm_options_not_mapping": (lambda c, loc: c.configure_llm(loc, options=[1]), InvalidOptions),
    "llm_model_not_str": (lambda c, loc: c.configure_llm(loc, model=5), BadRequest),
    "skills_not_list": (lambda c, loc: c.configure_skills(loc, "read"), BadRequest),
    "negative_max_messages": (lambda c, loc: c.conversation_messages(loc, max_messages=-1), InvalidOptions),
    "await_timeout_not_int": (lambda c, loc: c.await_generation(loc, "gen_x", timeout_ms="soon"), BadRequest),
    "await_unknown_ref": (lambda c, loc: c.await_generation(loc, "gen_unknown"), NotFound),
    "blank_locator": (lambda c, loc: c.send_user_message("   ", "x"), InvalidLocator),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_gets_its_typed_error_and_changes_nothing(client, conv, name):
    client.send_user_message(conv, "before")
    before = client.conversation_thread_entries(conv)
    call, error = BAD_CALLS[name]
    with pytest.raises(error):
        call(client, conv)
    assert client.conversation_thread_entries(conv) == before


def test_invalid_generation_options_still_return_a_ref(client, conv):
    client.send_user_message(conv, "hi")
    for options in ({"temperature": "hot"}, {"unknown_option": True}, {"backend": "not-configured"}):
        ref = client.generate_assistant_reply(conv, **options)
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        assert raised.value.category == "config"
    assert [m.role for m in client.conversation_messages(conv)] == ["user"]
