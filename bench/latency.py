"""Scenario 1 — latency of one generation, next to fresh-process peers.

genvisor: `send_and_generate` on the zero-delay scripted backend, a fresh worker per
generation, journal on, one client, one call at a time. Peers: the same trivial job
through pools whose every process runs one job (bench.peers). Rounds interleave the
rows so drift on a shared machine hits them alike. A second, traced daemon
(bench.traced_daemon) gives the breakdown of where a generation's time goes.
"""

from __future__ import annotations

import bisect
import time
from pathlib import Path

import msgspec

from bench import peers
from bench.harness import Daemon, daemon_config
from bench.report import Result, Table, figure
from bench.stats import Summary, fmt, fmt_ratio, ratio, summarize

GENVISOR = "genvisor send_and_generate (fresh worker per generation)"
ROUNDS = 4


def generations(daemon: Daemon, n: int, prefix: str = "lat") -> list[tuple[float, float]]:
    """`n` sequential generations over 50 conversations: (sent, answered) perf_counter pairs."""
    spans = []
    with daemon.client() as client:
        for i in range(n):
            start = time.perf_counter()
            _, result = client.send_and_generate(f"{prefix}-{i % 50}", "hello")
            spans.append((start, time.perf_counter()))
            assert result.text == "hello", result
    return spans


def peer_samples(factory, n: int) -> list[float]:
    samples = []
    with factory(1) as call:
        for _ in range(3):  # the pool's first process is started at open: skip it
            call("warm")
        for _ in range(n):
            start = time.perf_counter()
            assert call("hello") == "hello"
            samples.append((time.perf_counter() - start) * 1000)
    return samples


def run(ctx) -> Result:
    n = ctx.n(full=400, quick=60)
    samples: dict[str, list[float]] = {GENVISOR: []}
    with Daemon(ctx.dir("latency"), daemon_config()) as daemon:
        generations(daemon, 20, "warm")
        for _ in range(ROUNDS):
            spans = generations(daemon, n // ROUNDS)
            samples[GENVISOR] += [(b - a) * 1000 for a, b in spans]
            for name, (factory, slowness) in peers.LATENCY_PEERS.items():
                samples.setdefault(name, []).extend(peer_samples(factory, max(3, n // ROUNDS // slowness)))
    summaries = {name: summarize(s) for name, s in samples.items()}
    base = summaries[GENVISOR]
    fastest = min((s for name, s in summaries.items() if name != GENVISOR), key=lambda s: s.p50)
    fastest_name = next(name for name, s in summaries.items() if s is fastest)

    breakdown, refill = traced_breakdown(ctx, ctx.n(full=200, quick=40))

    rows = [[name, str(s.n), fmt(s.p50), fmt(s.p90), fmt(s.p99), fmt(s.max), fmt_ratio(ratio(s.p50, base.p50)), fmt_ratio(ratio(s.p99, base.p99))]
            for name, s in summaries.items()]
    hop_rows = [[hop, fmt(s.p50, 3), fmt(s.p90, 3), fmt(s.p99, 3), fmt_ratio(ratio(s.p50, sum(h.p50 for h in breakdown.values())))]
                for hop, s in breakdown.items()]
    if refill.n:
        hop_rows.append(["(off the path) spare refill: fork → Ready", fmt(refill.p50, 3), fmt(refill.p90, 3), fmt(refill.p99, 3), "–"])
    plot = "latency.png"
    _plot(ctx.out / plot, samples)
    _plot_breakdown(ctx.out / "latency-breakdown.png", breakdown)
    return Result(
        name="latency",
        tables=[
            Table("Generation latency, ms (one call at a time)", ["path", "n", "p50", "p90", "p99", "max", "p50 × genvisor", "p99 × genvisor"], rows),
            Table("Where a generation's time goes (traced daemon, ms)", ["hop", "p50", "p90", "p99", "share of p50 sum"], hop_rows,
                  note="A second daemon with timestamps at each hop (bench/traced_daemon.py); its p50s sum to a little more than the untraced p50."),
        ],
        metrics={
            "latency.p50_ms": base.p50,
            "latency.p99_ms": base.p99,
            "latency.p50_vs_fastest_peer": ratio(base.p50, fastest.p50),
            "latency.p99_vs_fastest_peer": ratio(base.p99, fastest.p99),
            "latency.fastest_peer_p50_ms": fastest.p50,
        },
        plots=[plot, "latency-breakdown.png"],
        notes=[f"Fastest fresh-process peer this run: {fastest_name} ({fastest.p50:.2f} ms p50)."],
        data={"summaries": summaries, "breakdown": breakdown, "refill": refill},
    )


# ---- the breakdown -------------------------------------------------------------------

HOPS = [
    ("client → daemon", "t0", "recv"),
    ("admit: journal the message, build the run spec", "recv", "admitted"),
    ("spawn: admission slot, then a spare worker for the run", "admitted", "acquired"),
    ("spawn: Start frame → worker runs", "acquired", "wstart"),
    ("run: mode + scripted backend, in the worker", "wstart", "wend"),
    ("result: worker → daemon", "wend", "settled"),
    ("commit: apply the outcome, submit its journal writes", "settled", "committed"),
    ("commit: journal durable (SQLite batch, off the loop)", "committed", "durable"),
    ("reply: daemon sends", "durable", "sent"),
    ("reply: → client", "sent", "t1"),
]


def traced_breakdown(ctx, n: int) -> tuple[dict[str, Summary], Summary]:
    trace_dir = ctx.dir("trace")
    with Daemon(ctx.dir("latency-traced"), daemon_config(), traced=trace_dir) as daemon:
        generations(daemon, 20, "warm")
        spans = generations(daemon, n)
    raw = msgspec.msgpack.decode((trace_dir / "daemon.msgpack").read_bytes())
    stamps: dict[str, list[float]] = {}
    for label, at in raw["stamps"]:
        stamps.setdefault(label, []).append(at)
    for times in stamps.values():
        times.sort()
    workers = sorted(tuple(map(float, line.split())) for line in (trace_dir / "workers.txt").read_text().split("\n") if line)
    stamps["wstart"] = [w[0] for w in workers]
    stamps["wend"] = [w[1] for w in workers]

    hops: dict[str, list[float]] = {hop: [] for hop, _, _ in HOPS}
    for t0, t1 in spans:
        at: dict[str, float | None] = {"t0": t0, "t1": t1}
        previous = t0
        for label in ("recv", "admitted", "acquired", "wstart", "wend", "settled", "committed", "durable"):
            at[label] = _first_after(stamps.get(label, []), previous, t1)
            previous = at[label] or previous  # a hook that is gone: measure from the last one
        at["sent"] = _last_before(stamps.get("sent", []), t1, t0)
        for hop, a, b in HOPS:
            if at.get(a) is not None and at.get(b) is not None:
                hops[hop].append((at[b] - at[a]) * 1000)
    begins, ends = stamps.get("spawn_begin", []), stamps.get("spawn_end", [])
    refill = summarize([(e - b) * 1000 for b, e in zip(begins, ends, strict=False) if e >= b])
    return {hop: summarize(s) for hop, s in hops.items()}, refill


def _first_after(times: list[float], after: float, before: float) -> float | None:
    i = bisect.bisect_left(times, after)
    return times[i] if i < len(times) and times[i] <= before else None


def _last_before(times: list[float], before: float, after: float) -> float | None:
    i = bisect.bisect_right(times, before) - 1
    return times[i] if i >= 0 and times[i] >= after else None


# ---- plots ---------------------------------------------------------------------------

def _plot(path: Path, samples: dict[str, list[float]]) -> None:
    with figure(path, width=8, height=4.5) as ax:
        for name, values in samples.items():
            ordered = sorted(values)
            ys = [(i + 1) / len(ordered) for i in range(len(ordered))]
            ax.step(ordered, ys, where="post", label=name, linewidth=2.5 if name == GENVISOR else 1.2)
        ax.set_xscale("log")
        ax.set_xlabel("submit → result, ms (log)")
        ax.set_ylabel("fraction of calls")
        ax.set_title("One trivial job in a fresh process: genvisor vs peers (same run)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")


def _plot_breakdown(path: Path, breakdown: dict[str, Summary]) -> None:
    with figure(path, width=8, height=3.2) as ax:
        left = 0.0
        for hop, s in breakdown.items():
            if s.n:
                ax.barh([0], [s.p50], left=left, label=hop)
                left += s.p50
        ax.set_yticks([])
        ax.set_xlabel("ms (p50 of each hop)")
        ax.set_title("Where a generation's time goes")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2)
