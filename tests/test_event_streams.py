"""A run's events: numbered from 1, ended by one terminal event, readable by any
client (`stream_events`) while the run is active, after it ended and after a restart;
a reader that falls behind the daemon's budget is told what it missed (`gap`)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TEST_CONFIG, Daemon
from genvisor.errors import AwaitTimeout, GenerationCanceled, InvalidOptions, LLMError, NotFound
from genvisor.types import GenerationEvent, GenerationResult

CHUNKS = [f"w{n} " for n in range(12)]


def _checked(events: list[GenerationEvent], ref: str) -> GenerationEvent:
    """The stream's terminal event, once checked: contiguous seqs from 1, every event of
    `ref`, exactly one terminal event, the last."""
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert {e.ref for e in events} == {ref}
    assert [e.terminal for e in events] == [False] * (len(events) - 1) + [True]
    return events[-1]


def test_every_run_numbers_its_events_from_1_and_ends_with_one_terminal_event(connect, conv):
    with connect() as owner, connect() as reader:
        pushed: list[GenerationEvent] = []
        _, result = owner.send_and_generate(conv, "go", generation_opts={"backend_opts": {"chunks": CHUNKS}}, on_event=pushed.append)
        ref = pushed[0].ref
        streamed = list(reader.stream_events(conv, ref))
        assert streamed == pushed  # the owner's pushed events and any reader's are one stream
        assert _checked(streamed, ref).kind == "completed"
        assert [e.kind for e in streamed[:2]] == ["started", "step"]
        assert "".join(e.text or "" for e in streamed if e.kind == "delta") == result.text == "".join(CHUNKS)

        error = {"category": "provider", "message": "upstream said no"}
        ref = owner.generate_assistant_reply(conv, backend_opts={"error": error})  # events off: kept all the same
        with pytest.raises(LLMError):
            owner.await_generation(conv, ref)
        failed = _checked(list(reader.stream_events(conv, ref)), ref)
        assert failed.kind == "failed" and failed.error is not None and failed.error.message == "upstream said no"

        ref = owner.generate_assistant_reply(conv, backend_opts={"delay_ms": 60_000})
        for event in reader.stream_events(conv, ref):
            if event.kind == "step":
                break  # the run is under way
        owner.cancel_generation(conv, "enough")
        canceled = _checked(list(reader.stream_events(conv, ref)), ref)
        assert canceled.kind == "canceled" and canceled.reason == "enough"


def _stream_all(client, conv, ref, after_seq=0):
    return list(client.stream_events(conv, ref, after_seq=after_seq, timeout_ms=30_000))


def test_an_owner_that_disconnects_mid_stream_picks_the_run_up_again_on_a_new_connection(connect, conv):
    chunks = [f"o{n} " for n in range(40)]
    owner = connect()
    owner.send_user_message(conv, "stream to me")
    ref = owner.generate_assistant_reply(conv, events=True, backend_opts={"chunks": chunks, "chunk_delay_ms": 10})
    pushed = []
    while len(pushed) < 8:
        note = owner.next_notification(timeout_ms=10_000)
        assert isinstance(note, GenerationEvent), note
        pushed.append(note)
    owner.close()  # gone mid-stream: its run goes on, with nobody to push to
    with connect() as again:
        rest = _stream_all(again, conv, ref, after_seq=pushed[-1].seq)
        assert _checked(pushed + rest, ref).kind == "completed"
        assert "".join(e.text or "" for e in pushed + rest if e.kind == "delta") == again.await_generation(conv, ref).text


def test_a_reader_follows_a_live_run_and_resumes_from_any_seq_on_a_new_connection(connect, conv):
    chunks = [f"c{n} " for n in range(40)]
    with connect() as owner:
        owner.send_user_message(conv, "stream slowly")
        ref = owner.generate_assistant_reply(conv, backend_opts={"chunks": chunks, "chunk_delay_ms": 10})
        with connect() as first:
            seen = []
            for event in first.stream_events(conv, ref):
                seen.append(event)
                if len(seen) == 10:
                    break  # the reader goes away mid-stream (its connection with it)
        assert not seen[-1].terminal
        with connect() as second:  # a reconnect: picks up after the last seq it saw, nothing twice, nothing missing
            rest = _stream_all(second, conv, ref, after_seq=seen[-1].seq)
        assert _checked(seen + rest, ref).kind == "completed"
        assert "".join(e.text or "" for e in seen + rest if e.kind == "delta") == owner.await_generation(conv, ref).text
        with connect() as late:
            past_the_end = _stream_all(late, conv, ref, after_seq=10_000)
            assert past_the_end == rest[-1:]  # a stream always ends with its terminal event
            assert _stream_all(late, conv, ref) == seen + rest  # and the whole of it stays readable


def test_stream_events_refuses_what_it_cannot_serve(connect, conv):
    with connect() as client:
        client.start_conversation(conv)
        with pytest.raises(NotFound):
            list(client.stream_events(conv, "gen_unknown"))
        client.send_and_generate(conv, "hi")
        ref = client.conversation(conv).state.run_history[0].run_id  # a run id is no ref
        with pytest.raises(NotFound):
            list(client.stream_events(conv, ref))
        ref = client.generate_assistant_reply(conv)
        with pytest.raises(InvalidOptions):
            list(client.stream_events(conv, ref, after_seq=-1))
        with pytest.raises(InvalidOptions):
            list(client.stream_events(conv, ref, timeout_ms=-5))


def test_a_stream_times_out_without_touching_the_run(connect, conv):
    with connect() as client:
        client.send_user_message(conv, "slow")
        ref = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 60_000})
        seen = []
        with pytest.raises(AwaitTimeout):
            for event in client.stream_events(conv, ref, timeout_ms=300):
                seen.append(event)
        assert [e.kind for e in seen] == ["started", "step"]
        run = client.conversation(conv).state.active_run
        assert run is not None and run.status == "running"  # it goes on
        client.cancel_generation(conv)
        with pytest.raises(GenerationCanceled):
            client.await_generation(conv, ref)


def _stored_events(daemon: Daemon, ref: str) -> int:
    with sqlite3.connect(f"file:{daemon.directory / 'state' / 'journal.sqlite3'}?mode=ro", uri=True) as db:
        return db.execute("SELECT COALESCE(MAX(last_seq), 0) FROM events WHERE ref = ?", (ref,)).fetchone()[0]


def test_events_are_readable_after_a_restart_and_a_killed_daemon_loses_only_what_it_had_not_journaled(daemon, conv):
    with daemon.client() as client:
        client.send_and_generate(conv, "first", generation_opts={"backend_opts": {"chunks": CHUNKS}})
        done_ref = next(e.data["ref"] for e in client.conversation_thread_entries(conv) if e.event == "run_started")
        before = _stream_all(client, conv, done_ref)
        client.send_user_message(conv, "second")
        chunks = [f"s{n} " for n in range(400)]
        ref = client.generate_assistant_reply(conv, backend_opts={"chunks": chunks, "chunk_delay_ms": 20})
        seen = []
        for event in client.stream_events(conv, ref):
            seen.append(event)
            if event.kind == "delta" and _stored_events(daemon, ref) >= 3:
                break  # some of it is journaled (once a second), the rest is not yet
    assert daemon.kill()
    daemon.start()
    with daemon.client() as client:
        assert _stream_all(client, conv, done_ref) == before  # an ended run's events, whole
        after = _stream_all(client, conv, ref)
        terminal = _checked(after, ref)
        kept = after[:-1]
        assert len(kept) >= 3 and kept == seen[: len(kept)]  # what was journaled, as it was sent
        assert terminal.kind == "failed" and terminal.error is not None
        assert terminal.error.details["reason"] == "daemon_restarted"
        # A reader that had seen more than was journaled still learns how the run ended.
        assert _stream_all(client, conv, ref, after_seq=seen[-1].seq) == [terminal]


@pytest.fixture
def small_budget(tmp_path):
    """A daemon that sends every delta as an event and sheds a connection's progress
    events past 1 MiB unread."""
    d = Daemon(tmp_path, TEST_CONFIG + "\n[defaults]\ncoalesce_ms = 0\n[clients]\nmax_unread_bytes = 1048576\n").start()
    yield d
    assert d.stop() == 0, d.log()


def test_a_slow_owner_is_told_which_events_were_shed_and_can_fetch_them(small_budget, conv):
    chunks = [f"{n:05d}" + "x" * 1000 for n in range(3000)]  # ≈3 MiB of events
    with small_budget.client(timeout_ms=30_000) as slow, small_budget.client() as watcher:
        slow.send_user_message(conv, "a lot")
        ref = slow.generate_assistant_reply(conv, events=True, backend_opts={"chunks": chunks})
        result = watcher.await_generation(conv, ref)  # the owner reads nothing meanwhile
        received: list[GenerationEvent] = []
        while not (received and received[-1].terminal):
            note = slow.next_notification(timeout_ms=10_000)
            assert isinstance(note, GenerationEvent), note
            received.append(note)
        assert isinstance(slow.next_notification(timeout_ms=10_000), GenerationResult)
        gaps = [e for e in received if e.kind == "gap"]
        assert gaps, "nothing was shed: the test did not fill the budget"
        # What arrived and what the gaps name cover every seq, once, in order.
        covered = []
        for event in received:
            covered.extend(range(event.first_seq, event.last_seq + 1) if event.kind == "gap" else [event.seq])
        assert covered == list(range(1, received[-1].seq + 1))
        # The shed events can be fetched: with them, the text is whole.
        events = {e.seq: e for e in received if e.kind != "gap"}
        for gap in gaps:
            for event in slow.stream_events(conv, ref, after_seq=gap.first_seq - 1):
                if event.seq > gap.last_seq:
                    break
                events[event.seq] = event
        assert "".join(events[seq].text or "" for seq in sorted(events)) == result.text
    with small_budget.client() as client:
        assert client.status().events_shed == sum(g.last_seq - g.first_seq + 1 for g in gaps)


def test_genvisor_follow_prints_a_running_turn_to_its_end(daemon, conv):
    chunks = [f"f{n} " for n in range(30)]
    with daemon.client() as client:
        client.send_user_message(conv, "follow me")
        ref = client.generate_assistant_reply(conv, backend_opts={"chunks": chunks, "chunk_delay_ms": 10})
        base = [sys.executable, "-m", "genvisor", "--endpoint", daemon.endpoint]
        followed = subprocess.run([*base, "follow", conv, ref], capture_output=True, text=True, timeout=60)
        assert followed.returncode == 0, followed.stderr
        assert followed.stdout == "".join(chunks) + "\n"
        ref = client.generate_assistant_reply(conv, backend_opts={"error": {"category": "auth", "message": "bad key"}})
        failed = subprocess.run([*base, "follow", conv, ref, "--json"], capture_output=True, text=True, timeout=60)
        assert failed.returncode == 1 and "bad key" in failed.stderr
        assert '"kind":"failed"' in failed.stdout.splitlines()[-1]


class UnrulyEventsDaemon(Daemon):
    """A daemon whose workers break the event protocol as the user message says (see
    unruly_events_daemon.py)."""

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).with_name("unruly_events_daemon.py")), *self.serve_arguments()]


def test_a_worker_event_out_of_turn_ends_its_run_alone(tmp_path):
    daemon = UnrulyEventsDaemon(tmp_path).start()
    try:
        with daemon.client() as client:
            for how in ("wrong_ref", "repeated_seq", "skipped_seq", "terminal_kind", "gap_kind"):
                client.send_user_message(how, how)
                ref = client.generate_assistant_reply(how, events=True)
                with pytest.raises(LLMError) as raised:
                    client.await_generation(how, ref)
                assert raised.value.details["reason"] == "protocol_error", how
                assert "out of turn" in raised.value.message
                events = list(client.stream_events(how, ref))
                assert [e.kind for e in events] == ["started", "failed"], how  # what it sent in turn, then its end
                _checked(events, ref)
            _, result = client.send_and_generate("fine", "a well-behaved turn")  # the daemon serves on
            assert result.text == "a well-behaved turn"
    finally:
        assert daemon.stop() == 0, daemon.log()
