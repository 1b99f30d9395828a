"""Telemetry with fixed cardinality: Prometheus metrics and the figures behind `status`.

Every run emits exactly one `run_started` and exactly one `run_finished`, whatever
happens to it. Label values come from closed sets — registered modes, configured
backends, the three outcomes, the error categories — never from ids, so the number
of series cannot grow with traffic.

The metrics live in a registry of their own (one per runtime, so embedded runtimes
in one process do not share counters). prometheus-client's metrics are thread-safe:
the loop updates them, the exposition thread reads them. Gauges are read on demand
from the objects that own the figure.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from genvisor.errors import LLMErrorCategory
from genvisor.supervisor.runs import ExecutorHealth
from genvisor.types import LatencySummary, TelemetryCount

OUTCOMES = ("completed", "failed", "canceled")
CATEGORIES = (*get_args(LLMErrorCategory), "none")

# Seconds. Fine at the low end, where a healthy daemon lives; coarse above.
_FAST = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_RUNS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Telemetry:
    def __init__(self, *, modes: list[str], backends: list[str]) -> None:
        self._modes = frozenset(modes)
        self._backends = frozenset(backends)
        self.registry = registry = CollectorRegistry()
        self.runs_started = Counter("genvisor_runs_started", "Runs started", ["mode", "backend"], registry=registry)
        self.runs_finished = Counter(
            "genvisor_runs_finished", "Runs finished, by outcome and error category", ["mode", "backend", "outcome", "category"],
            registry=registry,
        )
        self.run_seconds = Histogram(
            "genvisor_run_duration_seconds", "From a run's start in a worker to its outcome", ["outcome"], buckets=_RUNS, registry=registry
        )
        self.queue_wait_seconds = Histogram(
            "genvisor_queue_wait_seconds", "From admission to a worker slot", buckets=_FAST, registry=registry
        )
        self.worker_spawn_seconds = Histogram(
            "genvisor_worker_spawn_seconds", "From asking the zygote for a worker to the worker ready", buckets=_FAST, registry=registry
        )
        self.cancel_reaped_seconds = Histogram(
            "genvisor_cancel_reaped_seconds", "From a run's cancel to its worker reaped", buckets=_FAST, registry=registry
        )
        self.cleanup_failures = Counter(
            "genvisor_cleanup_failures", "Runs whose processes survived cleanup", registry=registry
        )
        self.admissions_rejected = Counter(
            "genvisor_admissions_rejected", "Generations refused with Overloaded", registry=registry
        )
        self.workspace_restores = Counter(
            "genvisor_workspace_restores", "Workspaces of runs that did not complete, by what became of them "
            "(restored, unchanged, restore_failed)", ["result"], registry=registry,
        )
        self.requests_received = Counter("genvisor_requests_received", "Client frames received", registry=registry)
        self.frames_rejected = Counter("genvisor_frames_rejected", "Client frames answered BadRequest", registry=registry)
        self.events_shed = Counter(
            "genvisor_events_shed", "Progress events not sent: their connection had too much unread", registry=registry
        )
        self.requests_refused_unread = Counter(
            "genvisor_requests_refused_unread", "Requests answered Overloaded: their connection had too much unread", registry=registry
        )
        self.requests_unanswered = Counter(
            "genvisor_requests_unanswered", "Requests of a connection that reads nothing, past its refusals", registry=registry
        )

    def by_node(self, read: Callable[[], ExecutorHealth]) -> None:
        """The runs on each cluster node, read at scrape time. A node's series goes with
        the node: their number is the cluster's size, not its history."""
        self.registry.register(_NodeCollector(read))

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A gauge whose value is read from its owner at scrape time."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    # ---- events ------------------------------------------------------------------------

    def run_started(self, mode: str, backend: str) -> None:
        self.runs_started.labels(self._mode(mode), self._backend(backend)).inc()

    def run_finished(self, mode: str, backend: str, outcome: str, category: str | None, seconds: float | None) -> None:
        assert outcome in OUTCOMES
        label = category if category in CATEGORIES else "none" if category is None else "unknown"
        self.runs_finished.labels(self._mode(mode), self._backend(backend), outcome, label).inc()
        if seconds is not None:
            self.run_seconds.labels(outcome).observe(seconds)

    # ---- reading -----------------------------------------------------------------------

    def snapshot(self) -> list[TelemetryCount]:
        counts = [
            TelemetryCount("run_started", s.labels["mode"], s.labels["backend"], "", "", int(s.value))
            for s in _samples(self.runs_started)
        ] + [
            TelemetryCount("run_finished", s.labels["mode"], s.labels["backend"], s.labels["outcome"], s.labels["category"], int(s.value))
            for s in _samples(self.runs_finished)
        ]
        return sorted(counts, key=lambda c: (c.event, c.mode, c.backend, c.outcome, c.category))

    def total(self, counter: Counter, **labels: str) -> int:
        return int(sum(s.value for s in _samples(counter) if all(s.labels.get(k) == v for k, v in labels.items())))

    def summary(self, histogram: Histogram) -> LatencySummary:
        """Count and p50/p99 in ms, interpolated within buckets (as PromQL's
        histogram_quantile does), summed over the histogram's labels."""
        buckets: dict[float, float] = {}
        for metric in histogram.collect():
            for sample in metric.samples:
                if sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
        cumulative = sorted(buckets.items())
        count = int(cumulative[-1][1]) if cumulative else 0
        return LatencySummary(count, _quantile(cumulative, 0.5), _quantile(cumulative, 0.99))

    def _mode(self, mode: str) -> str:
        return mode if mode in self._modes else "other"

    def _backend(self, backend: str) -> str:
        return backend if backend in self._backends else "unknown"


def _samples(counter: MetricWrapperBase):
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                yield sample


def _quantile(cumulative: list[tuple[float, float]], q: float) -> float | None:
    if not cumulative or cumulative[-1][1] == 0:
        return None
    rank = q * cumulative[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return round(lower_bound * 1000, 3)  # above the top bucket: its floor is all we know
            fraction = (rank - lower_count) / (count - lower_count) if count > lower_count else 1.0
            return round((lower_bound + (bound - lower_bound) * fraction) * 1000, 3)
        lower_bound, lower_count = bound, count
    return None


class _NodeCollector(Collector):
    def __init__(self, read: Callable[[], ExecutorHealth]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        health = self._read()
        active = GaugeMetricFamily("genvisor_node_active_runs", "Runs on each cluster node now", labels=["node", "host"])
        started = CounterMetricFamily("genvisor_node_runs_started", "Runs started on each cluster node", labels=["node", "host"])
        spares = GaugeMetricFamily("genvisor_node_spare_workers", "Pre-forked workers waiting on each cluster node", labels=["node", "host"])
        for node in health.nodes:
            active.add_metric([node.node, node.host], node.active_runs)
            started.add_metric([node.node, node.host], node.runs_started)
            spares.add_metric([node.node, node.host], node.spare_workers)
        lost = CounterMetricFamily("genvisor_nodes_lost", "Cluster nodes lost (their runs ended as node_lost)")
        lost.add_metric([], health.nodes_lost)
        return [active, started, spares, lost]
