"""The bench's tools say what they measured: its waits fail loudly, its traced daemon
runs the worker the daemon runs, its overload levels are named for the rate reached."""

from __future__ import annotations

import time

import msgspec
import pytest

from bench import harness, queue_depth, traced_daemon
from conftest import WaitTimedOut, wait_until
from genvisor.daemon import server
from genvisor.modes.loop import TurnTarget


def test_a_wait_that_runs_out_raises_naming_what_it_waited_for():
    began = time.monotonic()
    with pytest.raises(WaitTimedOut, match=r"timed out after 0.05 s waiting for the moon \(last seen: \[\]\)"):
        wait_until(list, 0.05, "the moon")
    assert time.monotonic() - began < 5
    assert wait_until(lambda: [1], 0.05, "a list") == [1]  # what it waited for, at once


def test_a_bench_wait_for_spares_that_never_come_raises(tmp_path, monkeypatch):
    daemon = harness.Daemon(tmp_path, harness.daemon_config(spares=2))
    monkeypatch.setattr(daemon, "workers", lambda: [])
    with pytest.raises(WaitTimedOut, match="2 spare workers under the zygote"):
        daemon.wait_for_spares(timeout_s=0.05)


def test_the_traced_worker_prepares_and_warms_as_the_daemons_own():
    """The traced target is the daemon's, only its run stamped: the zygote's prepare
    and the spare's warm are the very methods the daemon's workers run."""
    assert server.WORKER_TARGET is TurnTarget
    assert issubclass(traced_daemon.TracedTurnTarget, server.WORKER_TARGET)
    assert set(vars(traced_daemon.TracedTurnTarget)) & {"prepare", "warm"} == set()
    assert traced_daemon.TracedTurnTarget.prepare is TurnTarget.prepare
    assert traced_daemon.TracedTurnTarget.warm is TurnTarget.warm


def test_the_traced_daemon_runs_and_stamps_its_workers_runs(tmp_path):
    trace = tmp_path / "trace"
    daemon = harness.Daemon(tmp_path / "daemon", harness.daemon_config(spares=1), traced=trace).start()
    try:
        with daemon.client() as client:
            for i in range(2):
                _, result = client.send_and_generate(f"c{i}", "hello")
                assert result.text == "hello"
    finally:
        assert daemon.stop() == 0, daemon.log()
    runs = [line.split() for line in (trace / "workers.txt").read_text().splitlines()]
    assert len(runs) == 2 and all(float(start) <= float(end) for start, end in runs)
    stamps = msgspec.msgpack.decode((trace / "daemon.msgpack").read_bytes())
    assert stamps["missing"] == []  # every hop hooked, the worker's included
    assert {"recv", "admitted", "acquired", "settled", "committed", "durable", "sent"} <= {label for label, _ in stamps["stamps"]}


@pytest.mark.parametrize(("load", "offered", "label"), [
    (10.0, 1500.0, "10×"),
    (10.0, 830.0, "5.5× (target 10× not reached)"),
    (1.0, 147.0, "0.98×"),  # within 5 % of its target: reached
    (0.25, 37.5, "0.25×"),
])
def test_an_overload_level_is_named_for_the_rate_it_reached(load, offered, label):
    assert queue_depth.level_label(load, offered, capacity=150.0) == label
