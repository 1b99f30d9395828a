"""Prometheus metrics on loopback, and `genvisor status`."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import TEST_CONFIG, Daemon, spawn_marker, wait_for_marker, wait_until
from genvisor.daemon.telemetry import CATEGORIES, OUTCOMES
from genvisor.errors import GenerationCanceled, LLMError, Overloaded
from genvisor.modes.registry import registry


@pytest.fixture(scope="module")
def metered(tmp_path_factory):
    # `metrics` is a top-level key: it must come before the first table.
    config = 'metrics = "127.0.0.1:0"\n' + TEST_CONFIG + "[admission]\nmax_active = 1\nmax_queued = 1\n"
    d = Daemon(tmp_path_factory.mktemp("metered"), config=config).start()
    yield d
    assert d.stop() == 0, d.log()


def _scrape(d: Daemon) -> dict[str, list]:
    with d.client() as client:
        address = client.status().metrics
    assert address is not None and address.startswith("127.0.0.1:")
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def _value(samples: list, **labels: str) -> float:
    return sum(s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items()) and not s.name.endswith("_created"))


def test_metrics_count_runs_by_closed_labels(metered, tmp_path):
    with metered.client() as client:
        client.send_and_generate("m1", "hello")
        with pytest.raises(LLMError):
            client.send_and_generate("m2", "x", generation_opts={"backend_opts": {"error": {"category": "auth", "message": "no"}}})
        _wait_until_idle(client)  # slots are freed once their workers are reaped
        refs = {}
        argv, fifo, _ = spawn_marker(tmp_path, "m3")
        for conv in ("m3", "m4"):  # one running, one queued: full
            client.send_user_message(conv, "slow")
            refs[conv] = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 60_000, "spawn": argv})
        wait_for_marker(fifo)  # m3 has its worker: its cancel will be a cancel → reaped
        with pytest.raises(Overloaded):
            client.generate_assistant_reply("m5")
        full = _scrape(metered)  # m3 holds the one slot, m4 the one place in the queue
        assert _value(full["genvisor_active_workers"]) == 1
        assert _value(full["genvisor_queue_depth"]) == 1
        # The queued one first: it never reaches the pool, so no worker is handed to a run
        # being canceled (that worker would stay on as a second spare).
        for conv, ref in reversed(refs.items()):
            client.cancel_generation(conv, "enough")
            with pytest.raises(GenerationCanceled):
                client.await_generation(conv, ref)
        # Ids and free text must never become label values.
        with pytest.raises(LLMError):
            client.send_and_generate("m6", "y", generation_opts={"backend": "no-such-backend-" + "z" * 40})
        # Idle, and the pool back to its one spare (TEST_CONFIG): the gauges read that.
        _wait_until_idle(client, spares=1)

    metrics = _scrape(metered)
    finished = metrics["genvisor_runs_finished"]
    assert _value(finished, outcome="completed") >= 1
    assert _value(finished, outcome="failed", category="auth") >= 1
    assert _value(finished, outcome="canceled", category="canceled") >= 1
    assert _value(metrics["genvisor_runs_started"]) == _value(finished)  # every run ended exactly once
    assert _value(metrics["genvisor_admissions_rejected"]) >= 1
    assert _value(metrics["genvisor_queue_depth"]) == 0
    assert _value(metrics["genvisor_active_workers"]) == 0
    assert _value(metrics["genvisor_spare_workers"]) == 1
    assert _value(metrics["genvisor_worker_spawn_seconds"]) > 0
    assert _value(metrics["genvisor_cleanup_failures"]) == 0

    modes, backends = set(registry()), {"scripted", "unknown"}
    for sample in finished + metrics["genvisor_runs_started"]:
        assert sample.labels["mode"] in modes | {"other"}
        assert sample.labels["backend"] in backends
        assert sample.labels.get("outcome", "completed") in OUTCOMES
        assert sample.labels.get("category", "none") in CATEGORIES

    for name in ("genvisor_run_duration_seconds", "genvisor_queue_wait_seconds"):
        assert _count(metrics, name) >= 1, name

    # Cancel → reaped is observed once the worker is gone, which may be after the await.
    wait_until(lambda: _count(_scrape(metered), "genvisor_cancel_reaped_seconds"), 10, "a cancel→reaped observation")


def _wait_until_idle(client, spares: int = 0) -> None:
    """Until no run holds a slot or waits for one (slots are freed once their workers are
    reaped), and at least `spares` spare workers are waiting."""
    def idle() -> bool:
        status = client.status()
        return not status.active_runs and not status.queued_runs and status.spare_workers >= spares

    wait_until(idle, 20, lambda: f"no run active or queued and {spares} spares ({client.status()})")


def _count(metrics: dict[str, list], histogram: str) -> float:
    return sum(s.value for s in metrics[histogram] if s.name == histogram + "_count")


def test_status_shows_the_same_figures(metered):
    with metered.client() as client:
        client.send_and_generate("s1", "hello")
        status = client.status()
    assert status.runs_started == sum(status.runs_finished.values())
    assert status.runs_finished["completed"] >= 1
    assert (status.max_active, status.max_queued) == (1, 1)
    assert status.journal.startswith("sqlite:") and status.journal_unsynced == 0
    assert status.run_latency.count >= 1 and status.run_latency.p50_ms > 0

    command = [sys.executable, "-m", "genvisor", "--endpoint", metered.endpoint, "status"]
    human = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "runs" in human and "0/1 active" in human and f"pid {metered.pid}" in human
    as_json = json.loads(subprocess.run(command + ["--json"], capture_output=True, text=True, timeout=60, check=True).stdout)
    assert as_json["info"]["pid"] == metered.pid and as_json["max_active"] == 1


@pytest.mark.parametrize("address", ["0.0.0.0:9464", "10.1.2.3:9464", "example.com:80", "127.0.0.1", "127.0.0.1:99999"])
def test_metrics_are_served_on_loopback_only(tmp_path, address):
    result = subprocess.run(
        [sys.executable, "-m", "genvisor", "serve", "--endpoint", f"ipc://{tmp_path}/s.sock", "--state-dir", str(tmp_path),
         "--metrics", address],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "metrics" in result.stderr and "Traceback" not in result.stderr
