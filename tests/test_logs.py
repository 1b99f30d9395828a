"""The daemon says what happened to every run, one structured line each, in the form
its reader wants: text on a terminal, JSON lines when asked, journald's under systemd."""

from __future__ import annotations

import json
import os
import time

import pytest

from conftest import TEST_CONFIG, Daemon, spawn_marker, wait_for_marker
from genvisor.errors import GenerationCanceled, LLMError, Overloaded
from raw_peer import RawPeer


def _events(daemon: Daemon, *, finished: int = 0) -> list[dict]:
    """The daemon's JSON lines, once at least `finished` runs have logged their end (a
    run's line comes after its cleanup, which may follow its reply)."""
    deadline = time.monotonic() + 20
    while True:
        events = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
        if sum(e["event"] == "run.finished" for e in events) >= finished:
            return events
        assert time.monotonic() < deadline, f"fewer than {finished} run.finished lines"


@pytest.fixture
def json_daemon(tmp_path):
    d = Daemon(tmp_path, 'log_format = "json"\n' + TEST_CONFIG).start()
    yield d
    assert d.stop() == 0, d.log()


def test_every_run_logs_one_start_and_one_end_with_its_outcome_and_cleanup(json_daemon, conv, tmp_path):
    with json_daemon.client() as client:
        client.send_and_generate(conv + "_ok", "hello")
        client.send_user_message(conv + "_bad", "x")
        bad = client.generate_assistant_reply(conv + "_bad", timeout_ms=-5)
        with pytest.raises(LLMError):
            client.await_generation(conv + "_bad", bad)
        client.send_user_message(conv + "_crash", "x")
        crash = client.generate_assistant_reply(conv + "_crash", backend_opts={"crash": "signal"})
        with pytest.raises(LLMError):
            client.await_generation(conv + "_crash", crash)
        client.send_user_message(conv + "_late", "x")
        late = client.generate_assistant_reply(conv + "_late", timeout_ms=50, backend_opts={"crash": "hang"})
        with pytest.raises(LLMError):
            client.await_generation(conv + "_late", late)
        argv, fifo, tag = spawn_marker(tmp_path, "cancel")
        client.send_user_message(conv + "_cancel", "x")
        canceled = client.generate_assistant_reply(conv + "_cancel", backend_opts={"spawn": argv, "delay_ms": 60_000})
        wait_for_marker(fifo)
        client.cancel_generation(conv + "_cancel", "because")
        with pytest.raises(GenerationCanceled):
            client.await_generation(conv + "_cancel", canceled)
        client.send_and_generate(conv + "_ok", "after the cancel")
    events = _events(json_daemon, finished=6)
    started = [e for e in events if e["event"] == "run.started"]
    finished = {e["ref"]: e for e in events if e["event"] == "run.finished"}
    assert len(finished) == len(started) == len({e["ref"] for e in started}) == 6
    assert finished[bad]["outcome"] == "failed" and finished[bad]["category"] == "config" and finished[bad]["cleanup"] == "none"
    assert finished[crash]["category"] == "unknown" and finished[crash]["cleanup"] == "verified"
    assert finished[late]["category"] == "timeout" and finished[late]["ended_by"] == "sigkill"
    assert finished[canceled]["outcome"] == "canceled" and finished[canceled]["reason"] == "because"
    assert finished[canceled]["ended_by"] in ("stop", "sigterm", "sigkill")
    for line in finished.values():
        assert {"conversation", "mode", "backend", "duration_ms"} <= set(line), line
        assert line["mode"] == "coding" and line["backend"] == ("unknown" if line["ref"] == bad else "scripted"), line
    crashed = [e for e in events if e["event"] == "worker.crashed"]
    assert len(crashed) == 1 and crashed[0]["ref"] == crash and crashed[0]["signal_name"] == "SIGKILL"
    assert all(e["level"] in ("info", "warning", "error") and e["ts"].endswith("Z") for e in events)


def test_an_admission_refusal_is_logged(tmp_path, conv):
    d = Daemon(tmp_path, 'log_format = "json"\n' + TEST_CONFIG + "\n[admission]\nmax_active = 1\nmax_queued = 0\n").start()
    try:
        with d.client() as client:
            client.send_user_message(conv, "x")
            ref = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 60_000})
            with pytest.raises(Overloaded):  # max_active 1, no queue: refused
                client.send_and_generate(conv + "_refused", "x")
            client.cancel_generation(conv)
            with pytest.raises(GenerationCanceled):
                client.await_generation(conv, ref)
    finally:
        assert d.stop() == 0
    refused = [e for e in _events(d) if e["event"] == "admission.rejected"]
    assert len(refused) == 1 and refused[0]["active"] == 1 and refused[0]["level"] == "warning"


def test_rejected_frames_are_logged_at_most_once_a_second_with_a_count(json_daemon):
    with RawPeer(json_daemon.endpoint) as peer:
        for _ in range(50):
            peer.send(b"\xc1 not msgpack")
        for _ in range(50):
            peer.answer()
    rejected = [e for e in _events(json_daemon) if e["event"] == "frame.rejected"]
    assert 1 <= len(rejected) <= 3, rejected
    with json_daemon.client() as client:
        assert client.status().frames_rejected == 50


def test_a_zygote_restart_is_logged(json_daemon):
    zygote = next(p for p in json_daemon.descendants() if p.ppid() == json_daemon.pid)
    zygote.kill()
    zygote.wait(timeout=10)  # gone once the daemon reaped it (and took its spares off the shelf)
    with json_daemon.client() as client:
        client.send_and_generate("after", "hi")
    names = [e["event"] for e in _events(json_daemon)]
    assert "zygote.exited" in names and "zygote.restarting" in names


def test_text_lines_on_a_terminal_journal_lines_under_systemd(tmp_path):
    (tmp_path / "t").mkdir()
    text = Daemon(tmp_path / "t").start()
    try:
        with text.client() as client:
            client.send_and_generate("c", "hi")
    finally:
        assert text.stop() == 0
    line = next(line for line in text.log().splitlines() if " run.finished " in line)
    assert " INFO genvisor.daemon run.finished ref=gen_" in line and " outcome=completed " in line

    (tmp_path / "j").mkdir()
    journal = Daemon(tmp_path / "j")
    journal.log_path.touch()
    stat = os.stat(journal.log_path)
    journal.env["JOURNAL_STREAM"] = f"{stat.st_dev}:{stat.st_ino}"  # as systemd sets it: stderr is the journal
    journal.start()
    try:
        with journal.client() as client:
            client.send_and_generate("c", "hi")
    finally:
        assert journal.stop() == 0
    line = next(line for line in journal.log().splitlines() if " run.finished " in line)
    assert line.startswith("<6>genvisor.daemon run.finished ref=gen_")


def test_the_log_level_comes_from_the_environment(tmp_path):
    quiet = Daemon(tmp_path, 'log_format = "json"\n' + TEST_CONFIG, env={"GENVISOR_LOG_LEVEL": "WARNING"}).start()
    try:
        with quiet.client() as client:
            client.send_and_generate("c", "hi")
    finally:
        assert quiet.stop() == 0
    assert not [e for e in _events(quiet) if e["event"] in ("run.started", "run.finished")]
