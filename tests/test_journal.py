"""The durable journal: the SQLite store, and what a restarted daemon gives back."""

from __future__ import annotations

import subprocess
import sys
from concurrent import futures
from pathlib import Path

import pytest

from conftest import Daemon, wait_for_exit, wait_until
from genvisor.daemon.sqlite_store import SqliteStore
from genvisor.daemon.store import (
    AppendEntry,
    CreateConversation,
    ForgetGenerations,
    GenerationFinished,
    GenerationStarted,
    MemoryStore,
    StoredOutcome,
    StoreFailed,
)
from genvisor.errors import DaemonUnavailable, GenerationCanceled, LLMError
from genvisor.types import JournalEntry, LLMResult

KEY = ("proj", "c1")


def _entry(seq: int, content: str = "hi") -> JournalEntry:
    return JournalEntry(entry_id=f"e{seq}", seq=seq, kind="message", at=1.0 + seq, role="user", content=content)


def _writes():
    result = LLMResult(request_id="r", conversation_id="c1", backend="scripted", status="completed", text="ok")
    return [
        [CreateConversation(KEY, {"project_id": "proj", "x": [1, 2]}), CreateConversation((None, "c2"), {})],
        [AppendEntry(KEY, _entry(1)), AppendEntry(KEY, _entry(2, "second")), GenerationStarted("g1", KEY, "run1")],
        [GenerationFinished("g1", 100.0, StoredOutcome(result=result)), GenerationStarted("g2", (None, "c2"), "run2")],
        [GenerationStarted("g3", KEY, "run3"), GenerationFinished("g3", 5.0, StoredOutcome(canceled="why"))],
    ]


def test_sqlite_store_gives_back_what_the_memory_store_does(tmp_path):
    memory, sqlite = MemoryStore(), SqliteStore(tmp_path / "j.sqlite3")
    for batch in _writes():
        memory.write(batch)
        sqlite.write(batch)
    sqlite.close()
    reopened = SqliteStore(tmp_path / "j.sqlite3")
    try:
        expected, got = memory.load(retained_since=50.0), reopened.load(retained_since=50.0)
    finally:
        reopened.close()
    assert sorted(got.conversations, key=lambda c: c.key[1]) == sorted(expected.conversations, key=lambda c: c.key[1])
    assert sorted(got.generations, key=lambda g: g.ref) == sorted(expected.generations, key=lambda g: g.ref)
    # g3 finished before the horizon: gone; g2 is still in flight: kept.
    assert {g.ref: g.finished_at for g in got.generations} == {"g1": 100.0, "g2": None}
    assert [e.content for e in got.conversations[0].entries] == ["hi", "second"]


def test_a_batch_lands_whole_or_not_at_all(tmp_path):
    store = SqliteStore(tmp_path / "j.sqlite3")
    store.write([CreateConversation(KEY, {}), AppendEntry(KEY, _entry(1))])
    with pytest.raises(StoreFailed):
        # The second append reuses seq 1: the whole batch, the first append included, is refused.
        store.write([AppendEntry(KEY, _entry(2)), AppendEntry(KEY, _entry(1)), GenerationStarted("g", KEY, "r")])
    snapshot = store.load(retained_since=0)
    assert [e.seq for e in snapshot.conversations[0].entries] == [1]
    assert snapshot.generations == []
    store.write([ForgetGenerations(["nope"]), AppendEntry(KEY, _entry(2))])  # and it goes on
    assert [e.seq for e in store.load(retained_since=0).conversations[0].entries] == [1, 2]
    store.close()


def test_one_daemon_per_journal(tmp_path):
    first = SqliteStore(tmp_path / "j.sqlite3")
    with pytest.raises(StoreFailed, match="in use by another genvisor daemon"):
        SqliteStore(tmp_path / "j.sqlite3")
    first.close()
    SqliteStore(tmp_path / "j.sqlite3").close()  # released with the first


def test_a_journal_from_a_newer_genvisor_is_refused(tmp_path):
    SqliteStore(tmp_path / "j.sqlite3").close()
    import sqlite3

    db = sqlite3.connect(tmp_path / "j.sqlite3")
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreFailed, match="schema 99"):
        SqliteStore(tmp_path / "j.sqlite3")


def test_a_second_daemon_on_the_same_state_dir_refuses_to_start(daemon, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "genvisor", "serve", "--endpoint", f"ipc://{tmp_path}/other.sock", "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert f"in use by another genvisor daemon (pid {daemon.pid})" in result.stderr
    assert daemon.client().ping().pid == daemon.pid


def _restart(daemon: Daemon, *, kill: bool) -> None:
    if kill:
        # The zygote dies with the daemon and the workers with the zygote (PDEATHSIG).
        alive = wait_for_exit(daemon.kill(), timeout_s=10)
        assert not alive, f"processes outlived a killed daemon: {alive}"
    else:
        assert daemon.stop() == 0
    daemon.start()


def test_everything_comes_back_after_a_restart(daemon, conv):
    with daemon.client() as client:
        client.ensure_conversation(conv, project_id="p", metadata={"team": "a"})
        loc = ("p", conv)
        client.configure_llm(loc, model="m-1", options={"temperature": 0.5})
        client.configure_skills(loc, ["read_file"])
        _, result = client.send_and_generate(loc, "hello")
        completed = client.generate_assistant_reply(loc)  # a second reply, awaited after the restart
        client.await_generation(loc, completed)
        client.send_user_message(loc, "again")
        failed = client.generate_assistant_reply(loc, backend_opts={"error": {"category": "provider", "message": "down"}})
        with pytest.raises(LLMError):
            client.await_generation(loc, failed)
        canceled = client.generate_assistant_reply(loc, backend_opts={"delay_ms": 60_000})
        client.cancel_generation(loc, "changed my mind")
        before = client.conversation(loc)
        entries = client.conversation_thread_entries(loc)

    _restart(daemon, kill=False)

    with daemon.client() as client:
        assert client.conversation(loc) == before
        assert client.conversation_thread_entries(loc) == entries
        assert client.await_generation(loc, completed).text == before.state.messages[2].content
        with pytest.raises(LLMError, match="down"):
            client.await_generation(loc, failed)
        with pytest.raises(GenerationCanceled) as raised:
            client.await_generation(loc, canceled)
        assert raised.value.reason == "changed my mind"
        # And it goes on from where it was.
        conversation, _ = client.send_and_generate(loc, "after the restart")
        assert [m.content for m in conversation.state.messages][-2:] == ["after the restart", "after the restart"]
        assert [e.seq for e in client.conversation_thread_entries(loc)] == list(range(1, len(entries) + 5))


def test_a_run_in_flight_when_the_daemon_is_killed_is_resolved_once(daemon, conv):
    with daemon.client() as client:
        client.send_user_message(conv, "hello")
        ref = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 60_000})
        before = client.conversation_messages(conv)

    _restart(daemon, kill=True)

    with daemon.client() as client:
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref, timeout_ms=5_000)
        assert raised.value.details == {"reason": "daemon_restarted", "workspace": "unchanged"}
        assert raised.value.retryable
        assert client.conversation_messages(conv) == before  # nothing of the turn committed
        state = client.derived_state(conv)
        assert state.active_run is None
        # The conversation is usable at once: the restart ended the run.
        _, result = client.send_and_generate(conv, "retry")
        assert result.text == "retry"

    _restart(daemon, kill=True)  # a second restart resolves nothing again

    with daemon.client() as client:
        finished = [e for e in client.conversation_thread_entries(conv) if e.event == "run_finished"]
        assert [e.data.get("reason") for e in finished] == ["daemon_restarted", None]
        assistant = [m for m in client.conversation_messages(conv) if m.role == "assistant"]
        assert [m.content for m in assistant] == ["retry"]


def test_an_acknowledged_write_survives_kill_9(daemon, conv):
    """kill -9 right after a reply loses nothing it acknowledged. (Its write is long
    durable by then, gated or not: the test below is the one that tells.)"""
    for i in range(3):
        with daemon.client() as client:
            client.send_user_message(conv, f"message {i}")
        _restart(daemon, kill=True)
    with daemon.client() as client:
        assert [m.content for m in client.conversation_messages(conv)] == ["message 0", "message 1", "message 2"]


class HeldJournalDaemon(Daemon):
    """The daemon whose journal never commits the batch that appends `hold` (see
    held_journal_daemon.py); `held` appears once that batch has reached the store."""

    def __init__(self, directory: Path, hold: str) -> None:
        self.held = directory / "held"
        super().__init__(directory, env={"GENVISOR_TEST_HOLD": hold, "GENVISOR_TEST_HELD": str(self.held)})

    def command(self) -> list[str]:
        return [sys.executable, str(Path(__file__).with_name("held_journal_daemon.py")), *self.serve_arguments()]


def test_no_reply_leaves_before_its_write_is_durable(tmp_path, conv):
    """kill -9 while a change is applied in the daemon's memory, its reply queued, and
    its journal write not yet durable: the client that asked is not told of the change
    that the kill takes back. A daemon that answered before its write was durable
    would answer here, and then lose what it said was done."""
    daemon = HeldJournalDaemon(tmp_path, hold="HELD").start()
    try:
        with daemon.client() as client:
            assert client.status().journal.startswith("held sqlite:")  # the held store, not the plain one
            client.send_user_message(conv, "before")  # acknowledged, so durable
        with futures.ThreadPoolExecutor(max_workers=1) as pool:
            def send_held() -> None:
                with daemon.client(timeout_ms=60_000) as client:
                    client.send_user_message(conv, "HELD")

            told = pool.submit(send_held)
            wait_until(daemon.held.exists, 30, "the journal write of the held message to start")
            # This ping's answer is queued behind the reply to HELD and, like it, must
            # wait for the held write: an answer here is a frame sent before the journal
            # has made durable what the daemon did before it.
            with daemon.client(timeout_ms=1_500) as other, pytest.raises(DaemonUnavailable, match="no answer"):
                other.ping()
            family = daemon.kill()
            # The connection is lost with no reply on it (a reply that had arrived would be read first).
            with pytest.raises(DaemonUnavailable, match="closed the connection before answering"):
                told.result(timeout=60)
    except BaseException:
        if daemon.process.poll() is None:
            daemon.kill()  # its journal holds a write for good: a SIGTERM would wait on it
        raise
    assert not wait_for_exit(family, timeout_s=10), f"processes outlived the killed daemon: {family}"
    daemon.start()
    try:
        with daemon.client() as client:
            assert [m.content for m in client.conversation_messages(conv)] == ["before"]  # HELD was lost, and never acknowledged
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_a_memory_journal_starts_empty(tmp_path):
    d = Daemon(tmp_path, config="[journal]\nbackend = 'memory'\n").start()
    try:
        with d.client() as client:
            client.send_user_message("c", "hi")
            assert client.status().journal == "memory"
        _restart(d, kill=False)
        with d.client() as client:
            assert client.status().conversations == 0
        assert not (tmp_path / "state" / "journal.sqlite3").exists()
    finally:
        assert d.stop() == 0
