"""A client that is slow to read loses nothing; one that never reads cannot make the
daemon hold more than its budget."""

from __future__ import annotations

import msgspec
import pytest
import zmq

from conftest import TEST_CONFIG, Daemon, wait_until
from genvisor.errors import Overloaded
from genvisor.ipc import codec
from genvisor.ipc.frames import Failure, GetConversation, Locator, Reply
from genvisor.types import GenerationEvent, GenerationResult

DELTAS = 5_000


@pytest.fixture(scope="module")
def uncoalesced(tmp_path_factory):
    """A daemon that sends every delta as an event of its own: 5 000 frames to queue."""
    d = Daemon(tmp_path_factory.mktemp("uncoalesced"), TEST_CONFIG + "\n[defaults]\ncoalesce_ms = 0\n").start()
    yield d
    assert d.stop() == 0


def test_a_client_that_reads_late_gets_every_event_its_terminal_notification_and_its_next_reply(uncoalesced, conv):
    chunks = [f"d{n} " for n in range(DELTAS)]
    with uncoalesced.client() as slow, uncoalesced.client() as watcher:
        slow.send_user_message(conv, "stream a lot")
        ref = slow.generate_assistant_reply(conv, events=True, backend_opts={"chunks": chunks})
        # The slow client reads nothing until the run is over (another client awaits it):
        # by then every frame of it is queued somewhere between the daemon and the client.
        assert watcher.await_generation(conv, ref).text == "".join(chunks)
        events, terminal = [], None
        while terminal is None:
            note = slow.next_notification(timeout_ms=10_000)
            assert note is not None, f"only {len(events)} events, then nothing"
            if isinstance(note, GenerationEvent):
                events.append(note)
            else:
                terminal = note
        assert isinstance(terminal, GenerationResult) and terminal.result is not None
        assert [e.seq for e in events] == list(range(1, len(events) + 1))  # none missing
        assert [e.text for e in events if e.kind == "delta"] == chunks
        assert slow.conversation(conv).state.status == "responding"  # and the next reply arrives


BUDGET = 16 * 1024 * 1024


@pytest.fixture
def budget_daemon(tmp_path):
    d = Daemon(tmp_path, TEST_CONFIG + f"\n[clients]\nmax_unread_bytes = {BUDGET}\n").start()
    yield d
    assert d.stop() == 0, d.log()


def _peak_rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _wait_received(daemon: Daemon, count: int) -> None:
    with daemon.client() as client:
        wait_until(lambda: client.status().requests_received >= count, 60, f"the daemon to read {count} requests")


def test_a_client_that_never_reads_is_held_to_its_budget_and_every_request_is_answered(budget_daemon, conv):
    requests = 150
    with budget_daemon.client(timeout_ms=30_000) as client:
        client.record_assistant_message(conv, "m" * (4 * 1024 * 1024))
        received = client.status().requests_received
    baseline = _peak_rss(budget_daemon.pid)
    peer = zmq.Context.instance().socket(zmq.DEALER)
    peer.setsockopt(zmq.RCVHWM, 1)  # this client's own ZeroMQ takes next to nothing off the daemon
    peer.setsockopt(zmq.RCVBUF, 64 * 1024)
    peer.setsockopt(zmq.LINGER, 0)
    peer.connect(budget_daemon.endpoint)
    try:
        for n in range(1, requests + 1):
            peer.send(codec.encode_request(n, GetConversation(Locator(None, conv))))
        _wait_received(budget_daemon, received + 1 + requests)  # + 1: the status call itself
        grown = _peak_rss(budget_daemon.pid) - baseline
        answers = {}
        while len(answers) < requests:
            assert peer.poll(30_000), f"{len(answers)} answers of {requests}"
            frame = codec.decode_server_frame(peer.recv())
            assert isinstance(frame, (Reply, Failure))
            answers[frame.id] = frame
    finally:
        peer.close(linger=0)
    assert sorted(answers) == list(range(1, requests + 1))
    replies = [n for n, a in answers.items() if isinstance(a, Reply)]
    refused = [n for n, a in answers.items() if isinstance(a, Failure)]
    assert all(answers[n].error.code == Overloaded.code for n in refused)
    assert replies and refused and max(replies) < min(refused)  # answered until the budget, refused after
    body = msgspec.msgpack.decode(answers[replies[0]].body)
    assert len(body["state"]["messages"][0]["content"]) == 4 * 1024 * 1024
    # The budget, what ZeroMQ holds for one peer (16 frames), and encoding headroom.
    assert grown < BUDGET + 16 * 4.2 * 1024 * 1024 + 48 * 1024 * 1024, f"the daemon grew by {grown / 2**20:.0f} MiB"
    with budget_daemon.client() as client:
        assert client.status().requests_refused_unread == len(refused)
