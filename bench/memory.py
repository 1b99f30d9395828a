"""Scenario 5 — memory: the daemon idle, with 10 000 idle conversations, a worker's own
memory, RSS/fds across 10 000 generations (they must stay flat), and 1 000 runs paused
for approvals at once (no worker each, a few KiB; bench.paused).

Peer: a bare interpreter that imports what the daemon is built on (trio, zmq,
msgspec) — the floor any Python daemon of this kind starts from.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import paused
from bench.harness import MIB, Daemon, daemon_config, fd_kinds, uss_mib
from bench.loops import LoopResult, closed_loop, genvisor_caller
from bench.report import Result, Table, figure
from bench.stats import fmt, fmt_ratio, ratio, summarize

# Generation outcomes are kept awaitable for `outcome_retention_s` (600 s by default);
# a soak of thousands would measure that retention, not a leak. Keep them 1 s here.
SOAK_CONFIG = "\n[generations]\noutcome_retention_s = 1.0\n"
# Conversations per soak client, taken in turn: ≈12 turns each over 10 000 generations.
# One conversation per client would measure its growing history (in every reply), not
# the daemon's per-generation cost.
ROTATE = 100


def bare_interpreter_rss_mib() -> float:
    code = "import trio, zmq, msgspec, psutil; print(psutil.Process().memory_info().rss)"
    return int(subprocess.check_output([sys.executable, "-c", code])) / MIB


def add_conversations(daemon: Daemon, count: int, threads: int = 4) -> None:
    """`count` idle conversations, each a user message and an assistant reply."""

    def add(part: int) -> None:
        with daemon.client() as client:
            for i in range(part, count, threads):
                client.send_user_message(f"idle-{i}", "please refactor the parser module")
                client.record_assistant_message(f"idle-{i}", "Done: the parser now reads tokens lazily.")

    workers = [threading.Thread(target=add, args=(p,)) for p in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def run(ctx) -> Result:
    conversations = ctx.n(full=10_000, quick=1_000)
    soak = ctx.n(full=10_000, quick=1_000)
    bare = bare_interpreter_rss_mib()
    with Daemon(ctx.dir("memory-idle"), daemon_config()) as daemon:
        time.sleep(0.5)  # measuring, not waiting for a condition: let start-up garbage go
        idle = daemon.rss_mib()
        zygote = daemon.zygote()
        zygote_rss = zygote.memory_info().rss / MIB if zygote else float("nan")
        worker_uss = summarize([u for w in daemon.workers() if (u := uss_mib(w)) is not None])
        begin = time.perf_counter()
        add_conversations(daemon, conversations)
        conv_seconds = time.perf_counter() - begin
        with_conversations = daemon.rss_mib()
    per_conv_kib = (with_conversations - idle) * 1024 / conversations
    projected = idle + per_conv_kib * 10_000 / 1024  # the 10 000 of the target, from a quick run's count

    with Daemon(ctx.dir("memory-soak"), daemon_config() + SOAK_CONFIG) as daemon:
        closed_loop(genvisor_caller(daemon.endpoint, "soak", ROTATE), 8, 1.0)  # warm: allocator, caches
        daemon.wait_idle()
        rss0, fds0, procs0 = daemon.rss_mib(), daemon.fds(), len(daemon.ps.children(recursive=True))
        kinds0 = fd_kinds(daemon.ps.pid)
        trace: list[tuple[float, int, float, int]] = []
        done = threading.Event()
        counter = {"n": 0}

        def sample() -> None:
            start = time.perf_counter()
            while not done.wait(0.25):
                trace.append((time.perf_counter() - start, counter["n"], daemon.rss_mib(), daemon.fds()))

        sampler = threading.Thread(target=sample)
        sampler.start()
        loop = _soak(daemon, soak, counter)
        done.set()
        sampler.join()
        time.sleep(1.5)  # measuring: let retained outcomes (1 s here) expire
        daemon.wait_idle()
        rss1, fds1, procs1 = daemon.rss_mib(), daemon.fds(), len(daemon.ps.children(recursive=True))
        kinds1 = fd_kinds(daemon.ps.pid)
    fd_change = {k: kinds1.get(k, 0) - kinds0.get(k, 0) for k in {*kinds0, *kinds1} if kinds1.get(k, 0) != kinds0.get(k, 0)}

    growth_kib = (rss1 - rss0) * 1024 / max(1, loop.completed)
    rows = [
        ["bare interpreter: import trio, zmq, msgspec (peer)", fmt(bare, 1), "1.00×"],
        ["daemon, idle (journal on, 4 spare workers)", fmt(idle, 1), fmt_ratio(ratio(idle, bare))],
        [f"daemon with {conversations:,} idle conversations", fmt(with_conversations, 1), fmt_ratio(ratio(with_conversations, bare))],
        ["  per conversation (KiB)", fmt(per_conv_kib, 2), "–"],
        ["  projected to 10 000 conversations", fmt(projected, 1), fmt_ratio(ratio(projected, bare))],
        ["zygote (the image every worker shares)", fmt(zygote_rss, 1), fmt_ratio(ratio(zygote_rss, bare))],
        ["one spare worker's own memory (USS, p50)", fmt(worker_uss.p50, 2), fmt_ratio(ratio(worker_uss.p50, bare))],
    ]
    soak_rows = [
        ["daemon RSS, MiB", fmt(rss0, 1), fmt(rss1, 1), fmt_ratio(ratio(rss1, rss0))],
        ["daemon open fds", str(fds0), str(fds1), fmt_ratio(ratio(fds1, fds0))],
        ["daemon's descendant processes", str(procs0), str(procs1), fmt_ratio(ratio(procs1, procs0))],
        ["RSS growth per generation, KiB", "–", fmt(growth_kib), fmt_ratio(ratio(growth_kib, per_conv_kib)) + " an idle conversation"],
    ]
    _plot(ctx.out / "memory.png", trace)
    paused_runs = ctx.n(full=1000, quick=200)
    pause = paused.measure(ctx.dir("memory-paused"), paused_runs, ctx.n(full=50, quick=20))
    fresh, resumed = pause.fresh_ms, pause.resume_ms
    paused_rows = [
        ["workers held by the paused runs", fmt(pause.workers_held), "0 (the bound)"],
        ["daemon RSS growth per paused run, KiB (all of them)", fmt(pause.kib_per_paused_run), "≤ 10"],
        ["  the second half's, KiB (what scales with paused runs)", fmt(pause.kib_per_paused_run_marginal), "≤ 10"],
        ["resume after approval → result, p50 ms", fmt(resumed.p50), fmt_ratio(ratio(resumed.p50, fresh.p50)) + " a fresh generation"],
        ["a fresh generation (same turn) → result, p50 ms", fmt(fresh.p50), "1.00×"],
    ]
    return Result(
        name="memory",
        tables=[
            Table("Resident memory, MiB", ["what", "MiB", "× bare interpreter"], rows,
                  note=f"{conversations:,} conversations added in {conv_seconds:.1f} s (each: a user message and a recorded reply, journaled)."),
            Table(f"Before and after {loop.completed:,} generations (8 clients, {loop.per_s:.0f}/s, {loop.errors} errors)",
                  ["", "before", "after", "after / before"], soak_rows,
                  note=f"Counted idle (no run active, spares back). fds that changed, by kind: {fd_change or 'none'}. "
                       "The daemon keeps every conversation's journal in memory, so RSS grows by what a turn adds to it "
                       "(a user message, a reply, two run notes): compare with an idle conversation's two messages."),
            Table(f"{paused_runs:,} runs paused for approvals at once (bench.paused)", ["", "measured", "bound"], paused_rows,
                  note="Each run's first tool call is a command that asks; counted once every run has asked and the daemon is "
                       "idle. Resumes alternate with fresh generations of the same turn (one command) in one run."),
        ],
        metrics={
            "memory.idle_rss_mib": idle,
            "memory.idle_rss_vs_bare_interpreter": ratio(idle, bare),
            "memory.conversations_rss_mib": projected,
            "memory.per_conversation_kib": per_conv_kib,
            "memory.worker_uss_mib": worker_uss.p50,
            "memory.rss_growth_after_generations": ratio(rss1, rss0),
            "memory.rss_growth_per_generation_kib": growth_kib,
            "memory.rss_growth_per_generation_vs_conversation": ratio(growth_kib, per_conv_kib),
            "memory.fd_growth_after_generations": float(fds1 - fds0),
            "memory.soak_errors": float(loop.errors),
            "memory.workers_held_by_paused_runs": float(pause.workers_held),
            "memory.kib_per_paused_run": pause.kib_per_paused_run,
            "memory.kib_per_paused_run_marginal": pause.kib_per_paused_run_marginal,
            "memory.resume_p50_vs_fresh_generation": ratio(resumed.p50, fresh.p50),
        },
        plots=["memory.png"],
        data={"trace": trace, "fds_before": kinds0, "fds_after": kinds1},
    )


def _soak(daemon: Daemon, count: int, counter: dict[str, int]) -> LoopResult:
    """8 closed-loop clients, in 2 s rounds (new clients each: connection churn too),
    until `count` generations are done (time-boxed at 10 min)."""
    caller = genvisor_caller(daemon.endpoint, "soak", ROTATE)
    begin = time.perf_counter()
    errors = 0
    while counter["n"] < count and time.perf_counter() - begin < 600:
        chunk = closed_loop(caller, 8, 2.0, warmup=0)
        counter["n"] += chunk.completed
        errors += chunk.errors
    return LoopResult(8, counter["n"], time.perf_counter() - begin, errors, [])


def _plot(path: Path, trace: list[tuple[float, int, float, int]]) -> None:
    with figure(path, width=7, height=3.5) as ax:
        gens = [t[1] for t in trace]
        ax.plot(gens, [t[2] for t in trace], label="daemon RSS, MiB", color="tab:blue")
        ax.set_xlabel("generations completed")
        ax.set_ylabel("RSS, MiB")
        ax.set_ylim(bottom=0)
        other = ax.twinx()
        other.plot(gens, [t[3] for t in trace], label="open fds", color="tab:orange")
        other.set_ylabel("open fds")
        other.set_ylim(bottom=0)
        ax.set_title("Daemon RSS and fds across the generation soak")
        ax.grid(True, alpha=0.3)
