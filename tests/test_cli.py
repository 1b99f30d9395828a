"""The client against real daemons: waiting as long as the run takes, a lost connection
ending a wait at once, and failing at once with no daemon."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from conftest import Daemon, wait_for_exit
from genvisor.client import Client
from genvisor.errors import DaemonUnavailable

GENVISOR = [sys.executable, "-m", "genvisor"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*GENVISOR, *args], capture_output=True, text=True, timeout=timeout)


def streaming(n: int = 100, delay_ms: int = 200) -> str:
    """backend_opts for a run that streams `n` deltas, one every `delay_ms`."""
    return json.dumps({"chunks": [f"c{i} " for i in range(n)], "chunk_delay_ms": delay_ms})


def test_the_client_waits_for_the_run_with_no_await_timeout(shared_daemon, conv):
    with Client(shared_daemon.endpoint, timeout_ms=500) as client:
        client.send_user_message(conv, "slow")
        ref = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 1500})
        assert client.await_generation(conv, ref, timeout_ms=None).text == "slow"
        _, result = client.send_and_generate(conv, "again", generation_opts={"backend_opts": {"delay_ms": 1500}},
                                             await_opts={"timeout_ms": None})
        assert result.text == "again"


def test_await_generation_streams_the_events_of_its_run(shared_daemon, conv):
    with shared_daemon.client() as client:
        client.send_user_message(conv, "x")
        ref = client.generate_assistant_reply(conv, events=True, backend_opts={"chunks": ["a", "b", "c"]})
        events = []
        result = client.await_generation(conv, ref, on_event=events.append)
    assert result.text == "abc"
    assert [e.text for e in events if e.kind == "delta"] == ["a", "b", "c"]
    assert all(e.ref == ref for e in events)


def _kill(daemon: Daemon) -> None:
    family = [p.pid for p in daemon.descendants()]
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(timeout=30)
    assert not wait_for_exit(family, timeout_s=10)


def test_a_daemon_killed_mid_await_ends_an_unbounded_client_wait(tmp_path, conv):
    d = Daemon(tmp_path).start()
    try:
        with Client(d.endpoint, timeout_ms=60_000) as client:
            client.send_user_message(conv, "x")
            ref = client.generate_assistant_reply(conv, events=True, backend_opts=json.loads(streaming()))
            seen = []

            def on_event(event) -> None:
                if event.kind == "delta" and not seen:
                    seen.append(event)
                    _kill(d)

            started = time.monotonic()
            with pytest.raises(DaemonUnavailable, match="closed the connection"):
                client.await_generation(conv, ref, timeout_ms=None, on_event=on_event)
            assert seen and time.monotonic() - started < 20
    finally:
        d.stop()


def test_a_reply_already_queued_is_read_before_the_lost_connection(tmp_path):
    from genvisor.client.dealer import WatchedDealer

    endpoint = f"ipc://{tmp_path}/fake.sock"
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.bind(endpoint)
    dealer = WatchedDealer(endpoint, None)
    try:
        dealer.send(b"request")
        assert router.poll(10_000)
        peer, _ = router.recv_multipart()
        router.send_multipart([peer, b"reply"])
        router.close(linger=5_000)  # flushes the reply, then the connection goes
        # Both the reply and the news of the lost connection are there before we look.
        deadline = time.monotonic() + 10
        while not dealer.lost:
            assert time.monotonic() < deadline, "the lost connection was never seen"
            dealer.poll(50)
        assert dealer.poll_reply(1_000) == zmq.POLLIN and dealer.recv() == b"reply"
        with pytest.raises(DaemonUnavailable, match="closed the connection"):
            dealer.poll_reply(1_000)
    finally:
        dealer.close()


def test_a_refusal_seen_before_the_wait_fails_it_at_once(tmp_path):
    from genvisor.client.dealer import WatchedDealer

    public, secret = zmq.curve_keypair()
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.curve_server, router.curve_secretkey, router.curve_publickey = True, secret, public
    endpoint = f"ipc://{tmp_path}/curve.sock"
    router.bind(endpoint)
    dealer = WatchedDealer(endpoint, None)  # plaintext at a CURVE endpoint: refused at the handshake
    try:
        deadline = time.monotonic() + 10
        while not dealer._refusal and dealer._monitor.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            dealer._watch()
        assert dealer._refusal, "the handshake never failed"
        # Taken in before the wait (as `send` does); no more handshakes, so no more news:
        # the wait must act on what it already has.
        router.close(linger=0)
        started = time.monotonic()
        with pytest.raises(DaemonUnavailable, match="requires CURVE"):
            dealer.poll_reply(10_000)
        assert time.monotonic() - started < 2
    finally:
        dealer.close()
        router.close(linger=0)


def _assert_fails_at_once(endpoint: str) -> None:
    started = time.monotonic()
    with Client(endpoint, timeout_ms=30_000) as client:
        with pytest.raises(DaemonUnavailable, match=r"no daemon at ipc://.*; start one with `genvisor serve"):
            client.ping()
    done = run("--endpoint", endpoint, "--timeout-ms", "30000", "ping")
    assert done.returncode == 3, done.stderr
    assert f"no daemon at {endpoint}; start one with `genvisor serve" in done.stderr
    assert time.monotonic() - started < 15  # not the 30 s timeouts


def test_no_socket_file_fails_at_once(tmp_path):
    _assert_fails_at_once(f"ipc://{tmp_path}/nobody.sock")


def test_a_socket_nobody_listens_on_fails_at_once(tmp_path):
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as bound:
        bound.bind(str(path))  # bound, never listening: connect is refused
        _assert_fails_at_once(f"ipc://{path}")


def test_the_socket_a_killed_daemon_left_fails_at_once(tmp_path):
    d = Daemon(tmp_path).start()
    _kill(d)
    assert Path(d.endpoint.removeprefix("ipc://")).exists()
    _assert_fails_at_once(d.endpoint)


def test_tcp_still_waits_out_the_timeout():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Client(f"tcp://127.0.0.1:{port}", timeout_ms=300) as client:
        with pytest.raises(DaemonUnavailable, match="no answer .* within 300 ms"):
            client.ping()


def test_the_demo_waits_for_its_daemon_to_come_up():
    done = run("demo", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "daemon up" in done.stdout and "daemon stopped (exit 0)" in done.stdout

