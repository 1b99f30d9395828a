"""One generation end to end through a real daemon and real worker processes."""

from __future__ import annotations

import os
import signal

import pytest

from conftest import find_tagged, spawn_marker, wait_for_group_gone, wait_for_marker
from genvisor.errors import AwaitTimeout, GenerationCanceled, GenerationInProgress, LLMError, NoGenerationInProgress, NotFound
from genvisor.types import GenerationCanceled as CanceledNote, GenerationEvent, GenerationResult


def test_send_and_generate_returns_the_reply_and_commits_it(shared_daemon, conv):
    with shared_daemon.client() as client:
        conversation, result = client.send_and_generate(conv, "hello there")
    assert result.text == "hello there"
    assert result.backend == "scripted" and result.finish_reason == "stop"
    state = conversation.state
    assert [(m.role, m.content) for m in state.messages] == [("user", "hello there"), ("assistant", "hello there")]
    assert state.status == "responding" and state.turn == 1
    metadata = state.messages[-1].metadata
    assert metadata["request_id"] == result.request_id and metadata["backend"] == "scripted"
    assert metadata["run_id"].startswith("run_")
    assert state.run_history[0].status == "completed" and state.active_run is None


def test_generate_then_await_and_the_owner_gets_one_terminal_notification(shared_daemon, conv):
    with shared_daemon.client() as client:
        client.send_user_message(conv, "ping")
        ref = client.generate_assistant_reply(conv, backend_opts={"reply": "pong"})
        assert client.await_generation(conv, ref).text == "pong"
        note = client.next_notification(timeout_ms=5_000)
        assert isinstance(note, GenerationResult) and note.ref == ref and note.result.text == "pong"
        assert client.next_notification(timeout_ms=50) is None
        # Outcomes are retained: a re-await gives the same result.
        assert client.await_generation(conv, ref).text == "pong"


def test_any_client_holding_the_ref_may_await_it(shared_daemon, conv):
    with shared_daemon.client() as owner, shared_daemon.client() as other:
        owner.send_user_message(conv, "shared")
        ref = owner.generate_assistant_reply(conv, backend_opts={"delay_ms": 50})
        assert other.await_generation(conv, ref).text == "shared"


def test_streamed_deltas_arrive_in_order_before_the_result(shared_daemon, conv):
    events: list[GenerationEvent] = []
    with shared_daemon.client() as client:
        _, result = client.send_and_generate(
            conv, "x", generation_opts={"backend_opts": {"chunks": ["a", "b", "c"]}}, on_event=events.append
        )
    assert result.text == "abc"
    assert "".join(e.text for e in events if e.kind == "delta") == "abc"  # coalesced or not, in order
    assert events[0].kind == "started" and events[-1].kind == "completed"
    assert [e.seq for e in events] == sorted(e.seq for e in events)


def test_backend_error_leaves_history_unchanged(shared_daemon, conv):
    error = {"category": "provider", "message": "upstream overloaded", "details": {"status": 503}}
    with shared_daemon.client() as client:
        with pytest.raises(LLMError) as raised:
            client.send_and_generate(conv, "hi", generation_opts={"backend_opts": {"error": error}})
        assert raised.value.category == "provider" and raised.value.retryable is True
        assert raised.value.details == {"status": 503, "workspace": "unchanged"}  # the run changed no file
        state = client.conversation(conv).state
        assert [m.role for m in state.messages] == ["user"]
        assert state.status == "pending_llm"
        assert state.run_history[0].status == "failed"
        # The guard is released: the next generation runs.
        _, result = client.send_and_generate(conv, "again")
        assert result.text == "again"


@pytest.mark.parametrize(
    ("crash", "expected"),
    [("exit", {"exit_code": 3}), ("signal", {"signal": signal.SIGKILL, "signal_name": "SIGKILL"})],
)
def test_a_crashing_worker_is_a_failed_run_and_the_daemon_lives_on(shared_daemon, conv, crash, expected):
    with shared_daemon.client() as client:
        with pytest.raises(LLMError) as raised:
            client.send_and_generate(conv, "hi", generation_opts={"backend_opts": {"crash": crash}})
        assert raised.value.category == "unknown"
        assert raised.value.message == "generation worker crashed"
        assert expected.items() <= raised.value.details.items()
        assert [m.role for m in client.conversation(conv).state.messages] == ["user"]
        assert client.ping().pid == shared_daemon.pid
        assert client.send_and_generate(conv, "still here")[1].text == "still here"


def test_invalid_options_still_return_a_ref_and_fail_with_config(shared_daemon, conv):
    with shared_daemon.client() as client:
        client.send_user_message(conv, "hi")
        for options in ({"max_messages": "many"}, {"backend": "nope"}, {"no_such_option": 1}):
            ref = client.generate_assistant_reply(conv, **options)
            with pytest.raises(LLMError) as raised:
                client.await_generation(conv, ref)
            assert raised.value.category == "config"


def test_second_generate_is_refused_while_one_runs(shared_daemon, conv):
    with shared_daemon.client() as client:
        client.send_user_message(conv, "hi")
        ref = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 60_000})
        with pytest.raises(GenerationInProgress):
            client.generate_assistant_reply(conv)
        with pytest.raises(GenerationInProgress):
            client.send_user_message(conv, "not recorded")
        client.cancel_generation(conv)
        with pytest.raises(GenerationCanceled) as raised:
            client.await_generation(conv, ref)
        assert raised.value.reason == "cancel_requested"
        assert [m.content for m in client.conversation(conv).state.messages] == ["hi"]


def test_cancel_notifies_the_owner_and_journals_the_reason(shared_daemon, conv):
    with shared_daemon.client() as client:
        client.send_user_message(conv, "hi")
        ref = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 60_000})
        client.cancel_generation(conv, reason="user_changed_mind")
        note = client.next_notification(timeout_ms=5_000)
        assert note == CanceledNote(ref=ref, reason="user_changed_mind")
        state = client.conversation(conv).state
        assert state.status == "canceled" and state.cancel_requested and state.cancel_reason == "user_changed_mind"
        assert state.run_history[0].status == "canceled"
        with pytest.raises(NoGenerationInProgress):
            client.cancel_generation(conv)


def test_await_timeout_cancels_by_default_and_re_await_reports_it(shared_daemon, conv):
    with shared_daemon.client() as client:
        client.send_user_message(conv, "slow")
        ref = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 60_000})
        with pytest.raises(AwaitTimeout):
            client.await_generation(conv, ref, timeout_ms=100)
        with pytest.raises(GenerationCanceled) as raised:
            client.await_generation(conv, ref, timeout_ms=0)
        assert raised.value.reason == "await_timeout"


def test_await_timeout_without_cancel_keeps_the_run_going(shared_daemon, conv):
    with shared_daemon.client() as client:
        client.send_user_message(conv, "steady")
        ref = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 400})
        with pytest.raises(AwaitTimeout):
            client.await_generation(conv, ref, timeout_ms=10, cancel_on_timeout=False)
        with pytest.raises(GenerationInProgress):
            client.generate_assistant_reply(conv)
        assert client.await_generation(conv, ref, timeout_ms=10_000).text == "steady"


def test_generation_deadline_kills_the_worker_and_fails_with_timeout(shared_daemon, conv):
    with shared_daemon.client() as client:
        client.send_user_message(conv, "too slow")
        ref = client.generate_assistant_reply(conv, timeout_ms=100, backend_opts={"delay_ms": 60_000})
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        assert raised.value.category == "timeout"
        assert [m.role for m in client.conversation(conv).state.messages] == ["user"]


@pytest.mark.parametrize("crash", [None, "hang"])
def test_cancel_kills_the_whole_process_group_including_grandchildren(shared_daemon, conv, crash, tmp_path):
    argv, fifo, tag = spawn_marker(tmp_path, conv)
    backend_opts = {"spawn": argv, "delay_ms": 60_000}
    if crash:
        backend_opts["crash"] = crash
    with shared_daemon.client() as client:
        client.send_user_message(conv, "hi")
        client.generate_assistant_reply(conv, backend_opts=backend_opts)
        wait_for_marker(fifo)
        grandchild = find_tagged(tag)
        pgid = os.getpgid(grandchild.pid)
        worker = grandchild.ppid()
        assert pgid == worker != shared_daemon.pid  # the worker leads its own group
        client.cancel_generation(conv)
        # Graceful stop (0.3 s), SIGTERM (0.3 s), then SIGKILL; generous margin for a loaded box.
        wait_for_group_gone(pgid, timeout_s=15)
        assert client.ping().pid == shared_daemon.pid


def test_unknown_ref_and_unknown_conversation_are_not_found(shared_daemon, conv):
    with shared_daemon.client() as client:
        with pytest.raises(NotFound):
            client.conversation(conv)
        with pytest.raises(NotFound):
            client.await_generation(conv, "gen_nope")
        with pytest.raises(NotFound):
            client.cancel_generation(conv)


def test_deltas_within_the_window_travel_as_one_event_and_lose_nothing(tmp_path, conv):
    from genvisor.client import Client
    from genvisor.daemon.config import Config, Defaults
    from genvisor.daemon.embedded import EmbeddedDaemon

    chunks = [f"c{i} " for i in range(300)]
    spaced = [f"s{i} " for i in range(4)]

    def deltas(coalesce_ms: int, backend_opts: dict) -> list[str]:
        events: list[GenerationEvent] = []
        config = Config(state_dir=str(tmp_path / f"state{coalesce_ms}"), defaults=Defaults(coalesce_ms=coalesce_ms))
        with EmbeddedDaemon(config) as daemon, Client(transport=daemon.connect) as client:
            _, result = client.send_and_generate(conv, "go", generation_opts={"backend_opts": backend_opts}, on_event=events.append)
        assert "".join(e.text for e in events if e.kind == "delta") == result.text  # order and content, exactly
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        return [e.text for e in events if e.kind == "delta"]

    burst = deltas(5, {"chunks": chunks})
    assert len(burst) < len(chunks) / 10  # a burst goes as a few events
    assert deltas(0, {"chunks": chunks}) == chunks  # off: each delta its own event
    assert deltas(5, {"chunks": spaced, "chunk_delay_ms": 40}) == spaced  # further apart than the window: each alone


@pytest.mark.parametrize("value", [-1, 1001])
def test_a_coalescing_window_out_of_range_is_refused_at_start(tmp_path, value):
    from genvisor.daemon.config import ConfigError, load_config

    path = tmp_path / "genvisor.toml"
    path.write_text(f"[defaults]\ncoalesce_ms = {value}\n")
    with pytest.raises(ConfigError, match="coalesce_ms must be within 0..1000"):
        load_config(path)
