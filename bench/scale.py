"""Scenario 6 — scale: 1 000 generations active at once (scripted `delay_ms`), each in
its own worker process, all completing without error, nothing left behind.

The daemon admits them all (max_active ≥ 1 000); each run holds its worker for
`delay_ms`, long enough for the last to start before the first ends. Measured: how
long the ramp to all-running takes, the peak of live workers and active runs, memory
at the peak, and that every run completed and every worker is gone afterwards.
Peer: none does this on 2 cores with a fresh process per job and a bounded memory
footprint better than "one process each"; the figures are the daemon's own.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from bench.harness import Daemon, daemon_config, uss_mib
from bench.report import Result, Table, figure
from bench.stats import fmt
from genvisor.types import GenerationResult


def run(ctx) -> Result:
    n = ctx.n(full=1000, quick=200)
    delay_ms = ctx.n(full=20_000, quick=6_000)
    config = daemon_config(max_active=n, max_queued=64)
    samples: list[tuple[float, int, int]] = []  # (t, workers running a generation, active runs)
    with Daemon(ctx.dir("scale"), config) as daemon:
        baseline = len(daemon.workers())
        done = threading.Event()
        peak_memory: dict[str, float] = {}

        def watch() -> None:
            with daemon.client() as client:
                start = time.perf_counter()
                while not done.is_set():
                    workers = daemon.workers()
                    status = client.status()
                    running = len(workers) - status.spare_workers  # spares wait for a run: not running one
                    samples.append((time.perf_counter() - start, running, status.active_runs))
                    if running >= n and "workers_uss_mib" not in peak_memory:
                        peak_memory["daemon_rss_mib"] = daemon.rss_mib()
                        peak_memory["workers_uss_mib"] = sum(u for w in workers if (u := uss_mib(w)) is not None)
                    done.wait(0.1)

        with daemon.client(timeout_ms=120_000) as client:
            for i in range(n):
                client.send_user_message(f"scale-{i}", "hello")
            watcher = threading.Thread(target=watch)
            watcher.start()
            begin = time.perf_counter()
            refs = {client.generate_assistant_reply(f"scale-{i}", backend_opts={"delay_ms": delay_ms}): i for i in range(n)}
            submitted_s = time.perf_counter() - begin
            results: dict[str, GenerationResult] = {}
            deadline = time.perf_counter() + delay_ms / 1000 + 120
            while len(results) < n and time.perf_counter() < deadline:
                note = client.next_notification(timeout_ms=1000)
                if isinstance(note, GenerationResult) and note.ref in refs:
                    results[note.ref] = note
            finished_s = time.perf_counter() - begin
        # after the last result: every worker of the run reaped, the pool back to its spares
        settle = time.perf_counter() + 30
        while len(daemon.workers()) > baseline and time.perf_counter() < settle:
            time.sleep(0.05)
        left = len(daemon.workers()) - baseline
        done.set()
        watcher.join()
        with daemon.client() as client:
            status = client.status()
    errors = sum(1 for r in results.values() if r.error is not None)
    missing = n - len(results)
    peak_workers = max((s[1] for s in samples), default=0)
    peak_active = max((s[2] for s in samples), default=0)
    all_running_at = next((t for t, w, _ in samples if w >= n), float("nan"))
    rows = [
        ["generations submitted", str(n), f"in {submitted_s:.2f} s"],
        [
            "peak workers running a generation (spares not counted)",
            str(peak_workers),
            f"all {n} running {all_running_at:.1f} s after the first submit" if peak_workers >= n else "never all at once",
        ],
        ["peak active runs (status)", str(peak_active), f"max_active {n}"],
        [
            "completed / failed / no result",
            f"{n - errors - missing} / {errors} / {missing}",
            f"last result {finished_s:.1f} s after the first submit (delay {delay_ms / 1000:.0f} s)",
        ],
        ["daemon RSS at the peak, MiB", fmt(peak_memory.get("daemon_rss_mib"), 1), "–"],
        ["workers' own memory at the peak (sum of USS), MiB", fmt(peak_memory.get("workers_uss_mib"), 0),
         f"{fmt(peak_memory.get('workers_uss_mib', float('nan')) / n, 2)} MiB per worker"],
        ["workers left after the last result", str(left), f"cleanup failures (status): {status.cleanup_failures}"],
    ]
    _plot(ctx.out / "scale.png", samples, n)
    return Result(
        name="scale",
        tables=[Table(f"{n} concurrently active generations", ["what", "value", "detail"], rows)],
        metrics={
            "scale.completed_fraction": (n - errors - missing) / n,
            "scale.errors": float(errors + missing + left + status.cleanup_failures),
            "scale.peak_workers_fraction": peak_workers / n,
            "scale.ramp_s": all_running_at,
        },
        plots=["scale.png"],
        data={"samples": samples[::5], "peak_memory": peak_memory},
    )


def _plot(path: Path, samples: list[tuple[float, int, int]], n: int) -> None:
    with figure(path, width=7, height=3.5) as ax:
        ax.plot([s[0] for s in samples], [s[1] for s in samples], label="workers running a generation")
        ax.plot([s[0] for s in samples], [s[2] for s in samples], label="active runs (status)", linestyle="--")
        ax.axhline(n, color="grey", linestyle=":", label=f"{n}")
        ax.set_xlabel("s since the first submit")
        ax.set_title(f"{n} generations at once")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
