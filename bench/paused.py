"""Part of scenario 5 (memory): runs paused for approvals cost journal and memory only.

`python -m bench.paused [--runs 1000] [--resumes 50]`

N conversations are made first, each with a workspace, `run_command` on and asking
for approval, and a user message: the daemon's RSS then is the baseline. Then each
starts a turn whose first tool call is a command; each run pauses. Once every run has
asked and the daemon holds no slot, counted: the workers that exist beyond the
zygote's spares (must be 0), and the daemon's RSS growth per paused run (the issue's
bound: ≤ 10 KiB; it includes each run's journal notes and its kept events), over all
of them and over the second half alone (by then what fills once — SQLite's page cache,
the allocator's arenas — is warm: the cost that scales with paused runs).

Then resume latency, side by side in one run: for some of the paused runs, the time
from `resolve_approval` to the turn's result (a fresh worker replays the run and runs
the command), against the same turn from `generate_assistant_reply` to its result in
a conversation that allows commands (a fresh generation: one worker, one command).
The issue's bound: resume p50 ≤ 2× the fresh generation's.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import Daemon, daemon_config
from bench.stats import Summary, summarize
from genvisor.types import GenerationEvent

COMMAND = [{"tool_calls": [{"name": "run_command", "arguments": {"argv": ["true"]}}]}, {"text": "done"}]
ASK = {"approvals": {"run_command": "ask"}}
ALLOW = {"approvals": {"run_command": "allow"}}
THREADS = 4


def _prepare(daemon: Daemon, workspaces: Path, names: list[str], mode_state: dict) -> None:
    def prepare(part: list[str]) -> None:
        with daemon.client() as client:
            for name in part:
                client.start_conversation(name, metadata={"workspace": str(workspaces / name)})
                client.configure_skills(name, ["run_command"])
                client.configure_mode(name, "coding", mode_state)
                client.send_user_message(name, "run the tests")

    _in_threads(prepare, names)


def _in_threads(work, names: list[str]) -> None:
    threads = [threading.Thread(target=work, args=(names[i::THREADS],)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@dataclasses.dataclass(frozen=True)
class Figures:
    runs: int
    pause_s: float
    workers_held: int
    rss_before_mib: float
    rss_paused_mib: float
    kib_per_paused_run: float
    kib_per_paused_run_marginal: float
    fresh_ms: Summary
    resume_ms: Summary


def measure(directory: Path, runs: int, resumes: int) -> Figures:
    workspaces = directory / "workspaces"
    config = daemon_config(max_active=64, max_queued=runs + 64)
    with Daemon(directory / "daemon", config) as daemon:
        paused_names = [f"paused-{i}" for i in range(runs)]
        fresh_names = [f"fresh-{i}" for i in range(resumes)]
        _prepare(daemon, workspaces, paused_names, ASK)
        _prepare(daemon, workspaces, fresh_names, ALLOW)
        daemon.wait_idle()
        spares = len(daemon.workers())
        rss0 = daemon.rss_mib()
        refs: dict[str, str] = {}

        def start(part: list[str]) -> None:
            with daemon.client() as client:
                for name in part:
                    refs[name] = client.generate_assistant_reply(name, backend_opts={"script": COMMAND})

        def pause(names: list[str]) -> float:
            """Start `names`' runs; once each has asked and the daemon is idle, its RSS."""
            _in_threads(start, names)
            with daemon.client(timeout_ms=120_000) as client:
                for name in names:  # each run's own events say when it asked
                    for event in client.stream_events(name, refs[name], timeout_ms=300_000):
                        if isinstance(event, GenerationEvent) and event.kind == "approval_requested":
                            break
            daemon.wait_idle(timeout_s=120)
            return daemon.rss_mib()

        begin = time.perf_counter()
        half = runs // 2
        rss_half = pause(paused_names[:half])
        rss1 = pause(paused_names[half:])
        pause_s = time.perf_counter() - begin
        held = len(daemon.workers()) - spares
        with daemon.client(timeout_ms=60_000) as client:
            fresh, resumed = [], []
            for paused, other in zip(paused_names[:resumes], fresh_names, strict=True):  # alternating: drift hits both alike
                t0 = time.perf_counter()
                ref = client.generate_assistant_reply(other, backend_opts={"script": COMMAND})
                client.await_generation(other, ref)
                fresh.append((time.perf_counter() - t0) * 1000)
                [request] = client.pending_approvals(paused)
                t0 = time.perf_counter()
                client.resolve_approval(paused, refs[paused], request.call_id, approve=True)
                client.await_generation(paused, refs[paused])
                resumed.append((time.perf_counter() - t0) * 1000)
            for name in paused_names[resumes:]:
                client.cancel_generation(name, "bench_done")
    return Figures(
        runs=runs, pause_s=pause_s, workers_held=held, rss_before_mib=rss0, rss_paused_mib=rss1,
        kib_per_paused_run=(rss1 - rss0) * 1024 / runs,
        # The second half's: caches that fill once (SQLite's pages, the allocator's arenas) are warm by then.
        kib_per_paused_run_marginal=(rss1 - rss_half) * 1024 / (runs - half),
        fresh_ms=summarize(fresh), resume_ms=summarize(resumed),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.paused", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--resumes", type=int, default=50)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="genvisor-paused-") as tmp:
        figures = measure(Path(tmp), args.runs, args.resumes)
    fresh, resumed = figures.fresh_ms, figures.resume_ms
    print(f"{args.runs} runs paused in {figures.pause_s:.1f} s: {figures.workers_held} workers held, "
          f"daemon RSS {figures.rss_before_mib:.1f} → {figures.rss_paused_mib:.1f} MiB "
          f"({figures.kib_per_paused_run:.2f} KiB per paused run, {figures.kib_per_paused_run_marginal:.2f} KiB for the "
          f"second half's; bound ≤ 10)")
    print(f"resume after approval p50 {resumed.p50:.1f} ms (p99 {resumed.p99:.1f}) vs a fresh generation p50 {fresh.p50:.1f} ms "
          f"(p99 {fresh.p99:.1f}): {resumed.p50 / fresh.p50:.2f}× (bound ≤ 2×)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
