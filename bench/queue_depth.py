"""Scenario 3 — queue depth under load: open-loop arrivals at rising rates, aimed at up
to 10× what the daemon can do. Each level is reported at the rate it reached (the load
generator shares the machine), with its target where that fell short.

Each level offers generations at a fixed rate for a few seconds, whatever happens to
the earlier ones (open loop: a late answer does not slow the arrivals). Measured per
level: the queue depth (`status()`, sampled), the latency of admitted generations
from their request to their result (and how far the senders fell behind schedule), and how many were refused with
`Overloaded` and how fast. Capacity is the peak the throughput scenario measured.

The daemon runs with a small admission window sized to the machine (below): under
saturation an admitted run waits behind at most `max_queued` others, so its latency
is bounded by about run time + max_queued / capacity (Little's law). The default
window (64 active + 256 queued) would let admitted latency grow to seconds: the
bound, not the mechanism, decides the overload p99.
"""

from __future__ import annotations

import collections
import threading
import time
from pathlib import Path

import msgspec

from bench.harness import Daemon, daemon_config
from bench.report import Result, Table, figure
from bench.stats import fmt, fmt_ratio, ratio, summarize
from genvisor.client import Client
from genvisor.errors import Overloaded
from genvisor.types import GenerationResult

MAX_ACTIVE = 4  # two per core: a run is mostly waiting on the other processes
MAX_QUEUED = 4
LOADS = [0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0]  # × capacity: the targets
SENDERS_ABOVE = 300.0  # offered /s beyond which two client threads send
# A level is labelled by the rate its senders reached; below this share of its target
# it says so (the load generator shares the daemon's two cores and falls behind).
REACHED_SHARE = 0.95


class Level(msgspec.Struct):
    load: float  # × capacity: the target
    offered_per_s: float  # the arrival rate reached
    arrivals: int
    admitted_ms: list[float]
    overloaded_ms: list[float]
    errors: int
    unfinished: int
    depth: list[int]  # queued_runs samples
    active: list[int]
    lag_ms: list[float]  # how late the senders were on their schedule


def level_label(load: float, offered_per_s: float, capacity: float) -> str:
    """A level as the load it offered: the rate reached × capacity, and its target when
    that was not reached (a "10×" that offered 4× is a 4× level)."""
    reached = offered_per_s / capacity
    label = f"{reached:.2g}×" if reached < 10 else f"{reached:.0f}×"
    if offered_per_s < REACHED_SHARE * load * capacity:
        label += f" (target {load:g}× not reached)"
    return label


def _sender(endpoint: str, name: str, start_at: float, rate: float, seconds: float, out: dict) -> None:
    admitted: list[float] = []
    refused: list[float] = []
    lags: list[float] = []
    errors = 0
    pending: dict[str, tuple[float, str]] = {}
    with Client(endpoint, timeout_ms=60_000) as client:
        free = collections.deque(f"{name}-{i}" for i in range(64))
        for conv in free:  # a context to answer (the scripted backend echoes it)
            client.send_user_message(conv, "hello")

        def take(note) -> None:
            nonlocal errors
            if isinstance(note, GenerationResult) and note.ref in pending:
                sent, conv = pending.pop(note.ref)
                admitted.append((time.perf_counter() - sent) * 1000)
                errors += note.error is not None
                free.append(conv)

        arrivals = 0
        interval = 1.0 / rate
        while (scheduled := start_at + arrivals * interval) < start_at + seconds:
            while (now := time.perf_counter()) < scheduled:
                wait_ms = int((scheduled - now) * 1000)
                if wait_ms >= 1:
                    if (note := client.next_notification(timeout_ms=wait_ms)) is not None:
                        take(note)
                else:
                    time.sleep(scheduled - now)  # a load generator keeping its schedule
            while (note := client.next_notification(0)) is not None:
                take(note)
            arrivals += 1
            if not free:  # every conversation busy: more than the window allows, refused anyway
                free.append(f"{name}-x{arrivals}")
                client.send_user_message(free[-1], "hello")
            conv = free.popleft()
            began = time.perf_counter()
            lags.append((began - scheduled) * 1000)
            try:
                ref = client.generate_assistant_reply(conv)
            except Overloaded:
                refused.append((time.perf_counter() - began) * 1000)
                free.append(conv)
                continue
            pending[ref] = (began, conv)
        ended = time.perf_counter()
        deadline = time.perf_counter() + 30
        while pending and time.perf_counter() < deadline:
            if (note := client.next_notification(timeout_ms=100)) is not None:
                take(note)
    out[name] = (arrivals, admitted, refused, errors, len(pending), lags, ended)


def offer(daemon: Daemon, load: float, rate: float, seconds: float, tag: str) -> Level:
    senders = 2 if rate > SENDERS_ABOVE else 1
    results: dict = {}
    start_at = time.perf_counter() + 0.3  # after the senders have prepared their conversations
    threads = [
        threading.Thread(target=_sender, args=(daemon.endpoint, f"{tag}-s{i}", start_at + i / rate, rate / senders, seconds, results))
        for i in range(senders)
    ]
    depth: list[int] = []
    active: list[int] = []
    for t in threads:
        t.start()
    with daemon.client() as client:
        while any(t.is_alive() for t in threads):
            status = client.status()
            depth.append(status.queued_runs)
            active.append(status.active_runs)
            time.sleep(0.02)  # the sampling period
    for t in threads:
        t.join()
    arrivals = sum(r[0] for r in results.values())
    sending_s = max(seconds, max(r[6] for r in results.values()) - start_at)  # longer when the senders lagged
    return Level(
        load=load,
        offered_per_s=arrivals / sending_s,
        arrivals=arrivals,
        admitted_ms=[x for r in results.values() for x in r[1]],
        overloaded_ms=[x for r in results.values() for x in r[2]],
        errors=sum(r[3] for r in results.values()),
        unfinished=sum(r[4] for r in results.values()),
        depth=depth,
        active=active,
        lag_ms=[x for r in results.values() for x in r[5]],
    )


def run(ctx) -> Result:
    seconds = ctx.n(full=3, quick=1)
    measured = ctx.shared.get("capacity_per_s")
    capacity = measured or 150.0
    capacity_note = f"capacity {capacity:.0f}/s" + ("" if measured else ", assumed: the throughput scenario did not run")
    levels: list[Level] = []
    config = daemon_config(max_active=MAX_ACTIVE, max_queued=MAX_QUEUED)
    with Daemon(ctx.dir("queue"), config) as daemon:
        with daemon.client() as client:
            pings = []
            for _ in range(200):
                began = time.perf_counter()
                client.ping()
                pings.append((time.perf_counter() - began) * 1000)
        ping = summarize(pings)
        for i, load in enumerate(LOADS):
            levels.append(offer(daemon, load, load * capacity, seconds, f"q{i}"))
    unloaded = summarize(levels[0].admitted_ms)
    top = levels[-1]
    top_label = level_label(top.load, top.offered_per_s, capacity)
    top_admitted = summarize(top.admitted_ms)
    top_refused = summarize(top.overloaded_ms)
    short = [f"{lv.load:g}×" for lv in levels if "not reached" in level_label(lv.load, lv.offered_per_s, capacity)]
    rows = []
    for lv in levels:
        a, o = summarize(lv.admitted_ms), summarize(lv.overloaded_ms)
        rows.append([
            level_label(lv.load, lv.offered_per_s, capacity), fmt(lv.offered_per_s, 0), str(lv.arrivals), str(len(lv.admitted_ms)),
            fmt(len(lv.overloaded_ms) / lv.arrivals if lv.arrivals else 0, 3), str(max(lv.depth, default=0)),
            fmt(a.p50, 1), fmt(a.p99, 1), fmt_ratio(ratio(a.p99, unloaded.p99)), fmt(o.p50, 3), fmt(o.p99, 3),
            fmt(summarize(lv.lag_ms).p99, 1), str(lv.errors + lv.unfinished),
        ])
    _plot(ctx.out / "queue.png", levels, capacity)
    return Result(
        name="queue_depth",
        tables=[Table(
            f"Open-loop arrivals (max_active {MAX_ACTIVE}, max_queued {MAX_QUEUED}, {capacity_note})",
            ["offered (reached × capacity)", "arrivals/s", "arrivals", "admitted", "Overloaded rate", "max queued", "admitted p50 ms",
             "admitted p99 ms", "p99 × lowest load", "Overloaded p50 ms", "Overloaded p99 ms", "sender lag p99 ms", "errors"],
            rows,
            note=f"'Offered': the arrival rate the senders reached, × capacity; a level that fell below "
                 f"{REACHED_SHARE:.0%} of its target says so"
                 + (f" (here: the {', '.join(short)} targets)" if short else " (here every target was reached)")
                 + ". Latency of an admitted generation: from its request to its result. 'Sender lag': how late the load "
                 f"generator (Python, on the same two cores) sent against its schedule — where it is large, the offered "
                 f"rate was not fully offered. Ping round trip in the same "
                 f"daemon: {ping.p50:.3f} ms p50, {ping.p99:.3f} ms p99; an Overloaded answer at the top level "
                 f"({top_label}) takes {fmt_ratio(ratio(top_refused.p50, ping.p50))} a ping (p50).",
        )],
        metrics={
            "queue_depth.max_queued_vs_bound": ratio(max(max(lv.depth, default=0) for lv in levels), MAX_QUEUED),
            "queue_depth.admitted_p99_vs_unloaded": ratio(top_admitted.p99, unloaded.p99),
            "queue_depth.overloaded_p50_ms": top_refused.p50,
            "queue_depth.overloaded_p99_ms": top_refused.p99,
            "queue_depth.overloaded_p50_vs_ping": ratio(top_refused.p50, ping.p50),
            "queue_depth.errors": float(sum(lv.errors + lv.unfinished for lv in levels)),
        },
        plots=["queue.png"],
        data={"levels": [msgspec.structs.replace(lv, admitted_ms=[], overloaded_ms=[], lag_ms=[]) for lv in levels],
              "admitted": {lv.load: summarize(lv.admitted_ms) for lv in levels}, "ping": ping,
              "reached": {lv.load: lv.offered_per_s / capacity for lv in levels}, "targets_not_reached": short},
    )


def _plot(path: Path, levels: list[Level], capacity: float) -> None:
    x = [lv.offered_per_s / capacity for lv in levels]
    with figure(path, ncols=3, width=4.2, height=3.4) as axes:
        axes[0].plot(x, [max(lv.depth, default=0) for lv in levels], marker="o", label="max")
        axes[0].plot(x, [sum(lv.depth) / max(1, len(lv.depth)) for lv in levels], marker=".", label="mean")
        axes[0].axhline(MAX_QUEUED, color="grey", linestyle=":", label="bound")
        axes[0].set_title("queue depth")
        axes[1].plot(x, [summarize(lv.admitted_ms).p99 for lv in levels], marker="o", label="p99")
        axes[1].plot(x, [summarize(lv.admitted_ms).p50 for lv in levels], marker=".", label="p50")
        axes[1].set_title("admitted latency, ms")
        axes[1].set_yscale("log")
        axes[2].plot(x, [len(lv.overloaded_ms) / max(1, lv.arrivals) for lv in levels], marker="o")
        axes[2].set_title("Overloaded rate")
        axes[2].set_ylim(0, 1)
        for ax in axes:
            ax.set_xscale("log")
            ax.set_xticks(LOADS, [f"{x:g}" for x in LOADS])
            ax.minorticks_off()
            ax.set_xlabel("offered load × capacity")
            ax.axvline(1.0, color="red", alpha=0.3)
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=7)
        axes[1].legend(fontsize=7)
