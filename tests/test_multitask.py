"""A generation started while one is active on its conversation: `multitask` says
whether it is refused (the default), queued behind it, or interrupts it."""

from __future__ import annotations

import collections
import threading

import pytest

from conftest import wait_until
from genvisor.errors import AwaitTimeout, GenerationCanceled, GenerationInProgress, InvalidOptions, LLMError, Overloaded
from genvisor.types import GenerationCanceled as CanceledNote, GenerationResult

SLOW = {"backend_opts": {"delay_ms": 60_000}}


def _telemetry(client) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for count in client.telemetry():
        counts[count.event] += count.count
    return counts


def test_a_bad_multitask_is_refused_and_changes_nothing(connect, conv):
    with connect() as client:
        client.send_user_message(conv, "hi")
        with pytest.raises(InvalidOptions) as raised:
            client.generate_assistant_reply(conv, multitask="later")
        assert raised.value.field == "multitask"
        ref = client.generate_assistant_reply(conv, **SLOW)
        with pytest.raises(GenerationInProgress):  # the default: the baseline's
            client.generate_assistant_reply(conv, multitask="reject")
        with pytest.raises(InvalidOptions):
            client.send_and_generate(conv, "not recorded", generation_opts={"multitask": 3})
        assert [m.content for m in client.conversation_messages(conv)] == ["hi"]
        client.cancel_generation(conv)
        with pytest.raises(GenerationCanceled):
            client.await_generation(conv, ref)


def test_queued_generations_run_in_order_each_with_its_message_recorded_when_its_turn_comes(connect, conv):
    with connect() as client:
        client.send_user_message(conv, "first")
        ref = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 300, "reply": "one"})
        answers: dict[str, str] = {}

        def send(text: str) -> None:
            with connect() as other:
                answers[text] = other.send_and_generate(conv, text, generation_opts={"multitask": "enqueue"})[1].text

        threads = []
        for position, text in enumerate(["second", "third"], start=1):
            threads.append(threading.Thread(target=send, args=(text,)))
            threads[-1].start()
            wait_until(lambda p=position: sum(e.event == "run_queued" for e in client.conversation_thread_entries(conv)) == p, 20,
                       f"{text!r} to be queued")
        assert [m.content for m in client.conversation_messages(conv)] == ["first"]  # queued turns: not yet recorded
        for thread in threads:
            thread.join(timeout=60)
        assert client.await_generation(conv, ref).text == "one"
        assert answers == {"second": "second", "third": "third"}  # each answered its own message
        contents = [(m.role, m.content) for m in client.conversation_messages(conv)]
        assert contents == [("user", "first"), ("assistant", "one"), ("user", "second"), ("assistant", "second"),
                            ("user", "third"), ("assistant", "third")]


def test_a_conversation_queue_is_bounded(connect, conv):
    with connect() as client:
        client.send_user_message(conv, "hi")
        active = client.generate_assistant_reply(conv, **SLOW)
        queued = [client.generate_assistant_reply(conv, multitask="enqueue") for _ in range(16)]
        with pytest.raises(Overloaded):
            client.generate_assistant_reply(conv, multitask="enqueue")
        client.stop_conversation(conv)  # the active run and every queued one, each canceled once
        for ref in [active, *queued]:
            with pytest.raises(GenerationCanceled) as raised:
                client.await_generation(conv, ref)
            assert raised.value.reason == "conversation_stopped"
        terminal = []
        while (note := client.next_notification(timeout_ms=0 if terminal else 5_000)) is not None:
            if isinstance(note, (CanceledNote, GenerationResult)):
                terminal.append(note)
        assert sorted(n.ref for n in terminal) == sorted([active, *queued])
        assert all(isinstance(n, CanceledNote) and n.reason == "conversation_stopped" for n in terminal)


def test_an_await_timeout_cancels_a_queued_generation_and_the_queue_goes_on(connect, conv):
    with connect() as client:
        before = _telemetry(client)
        client.send_user_message(conv, "hi")
        first = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 300, "reply": "one"})
        dropped = client.generate_assistant_reply(conv, multitask="enqueue", backend_opts={"reply": "never"})
        kept = client.generate_assistant_reply(conv, multitask="enqueue", backend_opts={"reply": "kept"})
        with pytest.raises(AwaitTimeout):
            client.await_generation(conv, dropped, timeout_ms=0)
        with pytest.raises(GenerationCanceled) as raised:
            client.await_generation(conv, dropped)
        assert raised.value.reason == "await_timeout"
        assert client.await_generation(conv, kept).text == "kept"
        assert client.await_generation(conv, first).text == "one"
        assert [m.content for m in client.conversation_messages(conv)] == ["hi", "one", "kept"]
        caused = _telemetry(client) - before
        assert caused == {"run_started": 3, "run_finished": 3}  # one start and one end per ref, the canceled queued one too


def test_an_interrupt_undoes_the_active_runs_changes_before_the_new_run_starts(connect, conv, tmp_path):
    workspace = tmp_path / f"ws-{conv}"
    workspace.mkdir()
    (workspace / "notes.txt").write_text("ORIGINAL\n")
    with connect() as client:
        client.start_conversation(conv, metadata={"workspace": str(workspace)})
        client.configure_skills(conv, ["read_file", "write_file"])
        client.send_user_message(conv, "change it, then think forever")
        change = {"tool_calls": [{"name": "write_file", "arguments": {"path": "notes.txt", "content": "CHANGED\n"}}]}
        ref = client.generate_assistant_reply(conv, backend_opts={"script": [change, {"text": "never", "delay_ms": 60_000}]})
        wait_until(lambda: (workspace / "notes.txt").read_text() == "CHANGED\n", 20, "the first run's change")
        read = {"tool_calls": [{"name": "read_file", "arguments": {"path": "notes.txt"}}]}
        _, result = client.send_and_generate(conv, "what does it say now?", generation_opts={
            "multitask": "interrupt", "backend_opts": {"script": [read, {"text": "read it"}]}})
        with pytest.raises(GenerationCanceled) as raised:
            client.await_generation(conv, ref)
        assert raised.value.reason == "interrupted"
        assert client.turn_changes(conv, ref).workspace == "restored"
        tool_output = [m.content for m in client.conversation_messages(conv, roles=["tool"])]
        assert tool_output == ["ORIGINAL\n"]  # the new run saw the workspace as it was before the interrupted one
        assert result.text == "read it"


def test_a_queued_generation_is_resolved_once_after_a_daemon_restart(daemon, conv):
    with daemon.client() as client:
        client.send_user_message(conv, "hi")
        active = client.generate_assistant_reply(conv, **SLOW)
        queued = client.generate_assistant_reply(conv, multitask="enqueue")
    assert daemon.kill()
    daemon.start()
    with daemon.client() as client:
        for ref in (active, queued):
            with pytest.raises(LLMError) as raised:
                client.await_generation(conv, ref)
            assert raised.value.details["reason"] == "daemon_restarted"
        assert client.send_and_generate(conv, "again")[1].text == "again"  # nothing is left holding the conversation


def test_genvisor_send_can_queue_a_turn_behind_a_running_one(daemon, conv):
    import subprocess
    import sys

    with daemon.client() as client:
        client.send_user_message(conv, "hi")
        ref = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 500, "reply": "first"})
        base = [sys.executable, "-m", "genvisor", "--endpoint", daemon.endpoint]
        refused = subprocess.run([*base, "send", conv, "now"], capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "active generation" in refused.stderr
        queued = subprocess.run([*base, "send", conv, "after it", "--multitask", "enqueue"], capture_output=True, text=True, timeout=60)
        assert queued.returncode == 0, queued.stderr
        assert queued.stdout == "after it\n"
        assert client.await_generation(conv, ref).text == "first"
        assert [m.content for m in client.conversation_messages(conv)] == ["hi", "first", "after it", "after it"]
