"""Scenario — streaming (issue 14): what relaying streamed deltas costs the daemon, how
many it delivers, and what it adds to each delta's latency, side by side with the
same stream read directly from the model server. `python -m bench.streaming
[--quick] [--part …]` runs it alone and prints its tables.

The load comes from processes of their own (bench.streaming_load: 4 `python -m
bench.streaming_load` processes, started once for the scenario and handed a job per
measurement), never from the scenario's process, so that one Python process's GIL is
not what a figure measures. Each load process starts its share of the streams at the
instant the scenario gives all of them, and its CPU is sampled with the daemon's.

**Delivery at 50 deltas/s a stream** (`deliver`). N concurrent generations (full: 10,
100, 1 000 — 50 000 deltas/s offered; quick: 10, 100) on a daemon with the default
config (`coalesce_ms` 5, `max_active` ≥ N), the scripted backend streaming 200 deltas
(quick: 150) 20 ms apart each, `events=True`; and the 100 again on a daemon with
`coalesce_ms` 0. A load process reads all its streams off one `Client` (one socket,
one thread). Every stream is checked: its delta texts joined are the result's text,
which is its chunks joined; a missing delta is counted, never hidden. The generations
are started paced (N of them over N × 15 ms, the pace the pool forks workers at), and
each waits before its first chunk for the rest of that ramp (scripted `delay_ms`), so
that all streams start at one moment rather than one ramp apart. Measured:

* deltas/s delivered: every delta, from that moment to the last delta's arrival (not
  from the first arrival: a starved daemon may relay nothing for seconds, then
  flood), and the longest stall in it (no delta arriving at all);
* over the middle 80 % of the deltas (from a tenth of them in to nine tenths: steady
  relaying, without the generations' start or their commits): the daemon's CPU (user
  + system, psutil on its pid, sampled every 50 ms) per delta relayed — the issue's
  figure —, the delta events per delta (coalescing joins deltas only when they
  bunch), the machine's busy cores and the load processes' share of them;
* over the whole run: the daemon's CPU per delta again (the commits and any starved
  stretch included) and the workers' (the zygote's reaped children, their start-up
  included).

The largest run's delivery over time is plotted with the daemon's and the machine's
CPU (streaming-timeline.png).

**Coalescing off and on** (`coalescing`, the comparison docs/performance.md quotes).
Two daemons side by side, `coalesce_ms` 0 and 5, rounds alternating between them: 10
streams of 400 scripted deltas 1 ms apart; the daemon's CPU per delta over the whole
round and the delta events per stream.

**Added latency** (`latency`). A FakeOpenAI (tests/openai_server.py) in this process
streams `text(…, chunk_delay_s=0.02)` replies — 100 pieces (quick: 50), 50 a second —
and notes when it writes each piece (`record_chunk_times`). Three readers of it, in
turns (rounds alternate their order): *direct*, the `openai` SDK (`OpenAI`, sync, one
client and keep-alive connection per slot) reading the stream; and genvisor with its
`openai` backend pointed at the fake (`stream` on), coalescing *off* and *on* (two
daemons), `generate_assistant_reply(events=True)` and the events read with
`next_notification`. N slots (10, 30, 100; quick: 10, 100), one thread and connection
each, spread over the load processes; a slot runs 2 streams back to back, its first
started at a staggered offset over one stream's length, so that the second streams
run while N others do: the figures are the second streams'. What is compared, per delta: its
arrival at the reader (a monotonic stamp as the SDK yields it, or as
`next_notification` returns its event) minus the moment the server wrote it — the
same server, the same clock — as a distribution per reader; the added latency is
genvisor's percentile minus direct's (p50, p99). A coalesced event carries several
pieces: each is counted from its own write, so the window's hold is in the figure.
Time to first delta: from just before the request (the SDK's `create`, genvisor's
`generate_assistant_reply`) to the first content delta's arrival; through genvisor it
includes admission, handing the run to a spare worker, the worker's LLM call setup
(an `AsyncOpenAI` client, a fresh connection) and the relay; genvisor's p50 minus
direct's. The fake's queue is FIFO: one reply is queued per stream, each with pieces
of its own, so a piece's write time is found by its text whichever request took it.
"""

from __future__ import annotations

import argparse
import bisect
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from bench.harness import REPO, Daemon, cpu, daemon_config
from bench.report import Result, Table, figure
from bench.stats import fmt, fmt_ratio, percentile, ratio
from bench.streaming_load import BIN_S, LatencyJob, LoadPool, ScriptedJob, ScriptedReport, StreamTrace

PROCESSES = 4  # load processes
CHUNK_DELAY_MS = 20  # 50 deltas/s a stream
FORK_PACE_S = 0.015  # the pace generations are started at in `deliver` (≈ the pool's fork rate under load)
PARTS = ("coalescing", "deliver", "latency")


def run(ctx: Any, parts: tuple[str, ...] = PARTS, streams: list[int] | None = None) -> Result:
    quick = ctx.quick
    points = sorted(streams or ([10, 100] if quick else [10, 100, 1000]))
    latency_points = [10, 100] if quick else [10, 30, 100]
    tables: list[Table] = []
    metrics: dict[str, float] = {}
    notes: list[str] = []
    data: dict[str, Any] = {}
    missing = 0
    plots: list[str] = []
    with LoadPool(PROCESSES) as pool:
        if "coalescing" in parts:
            table, figures, lost = _coalescing(ctx, pool, rounds=1 if quick else 3)
            tables.append(table)
            missing += lost
            data["coalescing"] = figures
            metrics["streaming.coalesce_on_vs_off_cpu"] = ratio(figures["on"]["cpu_us"], figures["off"]["cpu_us"])
        deliver: list[dict[str, Any]] = []
        if "deliver" in parts:
            deltas = 150 if quick else 200
            max_n = max(points)
            config = daemon_config(max_active=max_n + 16, max_queued=max_n + 64)
            with Daemon(ctx.dir("streaming-deliver"), config) as daemon:
                for n in points:
                    print(f"[streaming] deliver: {n} streams × {deltas} deltas …", file=sys.stderr, flush=True)
                    deliver.append(_deliver(daemon, pool, n, deltas))
            # The same 100 streams with coalescing off: at 50 deltas/s nothing is joined, and the window costs a wake-up
            with Daemon(ctx.dir("streaming-deliver-off"), config + "\n[defaults]\ncoalesce_ms = 0\n") as daemon:
                print(f"[streaming] deliver: 100 streams × {deltas} deltas, coalesce_ms 0 …", file=sys.stderr, flush=True)
                deliver_off = _deliver(daemon, pool, 100, deltas) | {"coalesce_ms": 0}
            missing += sum(p["missing"] for p in [*deliver, deliver_off])
            tables.append(_deliver_table([*deliver, deliver_off], deltas))
            _plot_timeline(ctx.out / "streaming-timeline.png", deliver[-1])
            plots.append("streaming-timeline.png")
            top = deliver[-1]
            metrics |= {
                "streaming.cpu_us_per_delta": top["cpu_us"],
                "streaming.deltas_per_s": top["rate"],
                "streaming.delivered_vs_offered": top["rate"] / top["offered"],
                "streaming.streams": float(top["n"]),
            }
            if deliver[0]["n"] == 10:
                metrics["streaming.delivered_vs_offered_10"] = deliver[0]["rate"] / deliver[0]["offered"]
            data["deliver"] = [{k: v for k, v in p.items() if k != "timeline"} for p in [*deliver, deliver_off]]
            if top["busy"] > 0.9 * psutil.cpu_count():
                notes.append(f"At {top['n']} streams the machine was saturated ({top['busy']:.2f} of {psutil.cpu_count()} cores busy), "
                             f"the load processes taking {top['load_cores']:.2f} cores of it: what was delivered is what this machine "
                             "relays, not the offered load.")
        latency: dict[int, dict[str, Any]] = {}
        if "latency" in parts:
            latency = _latency(ctx, pool, latency_points, pieces=50 if quick else 100, rounds=1 if quick else 2)
            missing += sum(side["missing"] for point in latency.values() for side in point.values())
            tables.append(_latency_table(latency))
            at = latency[100] if 100 in latency else latency[max(latency)]
            on, off, direct = at["on"], at["off"], at["direct"]
            metrics |= {
                "streaming.added_p50_ms": on["p50"] - direct["p50"],
                "streaming.added_p99_ms": on["p99"] - direct["p99"],
                "streaming.ttfd_added_p50_ms": on["ttfd_p50"] - direct["ttfd_p50"],
                "streaming.coalesce_off.added_p50_ms": off["p50"] - direct["p50"],
                "streaming.coalesce_off.added_p99_ms": off["p99"] - direct["p99"],
                "streaming.coalesce_off.ttfd_added_p50_ms": off["ttfd_p50"] - direct["ttfd_p50"],
            }
            busiest = max(on["machine_cores"], off["machine_cores"])
            if busiest > 0.9 * psutil.cpu_count():
                notes.append(f"At {max(k for k in latency if latency[k] is at)} streams through the openai backend the machine was "
                             f"saturated ({busiest:.2f} of {psutil.cpu_count()} cores busy; direct reads took {direct['machine_cores']:.2f}): "
                             "genvisor's added latency there is mostly waiting for a CPU.")
            data["latency"] = {str(n): {side: {k: v for k, v in s.items() if k != "samples"} for side, s in point.items()}
                               for n, point in latency.items()}
    metrics["streaming.missing_deltas"] = float(missing)
    if deliver or latency:
        _plot(ctx.out / "streaming.png", deliver, latency)
        plots.append("streaming.png")
    if latency:
        _plot_cdf(ctx.out / "streaming-latency.png", latency)
        plots.append("streaming-latency.png")
    return Result(name="streaming", tables=tables, metrics=metrics, plots=plots, notes=notes, data=data)


# ---- sampling CPU -------------------------------------------------------------------


class Sampler:
    """CPU seconds (user + system) of some processes, and the machine's busy CPU, every
    `interval_s`, stamped with time.monotonic(): `at(t)` interpolates between samples."""

    def __init__(self, pids: dict[str, list[int]], interval_s: float = 0.05) -> None:
        self._procs = {name: [psutil.Process(pid) for pid in group] for name, group in pids.items()}
        self._interval_s = interval_s
        self.times: list[float] = []
        self.series: dict[str, list[float]] = {name: [] for name in [*pids, "machine"]}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cpu-sampler", daemon=True)

    def __enter__(self) -> Sampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._sample()

    def _sample(self) -> None:
        values = {}
        for name, procs in self._procs.items():
            total = 0.0
            for proc in procs:
                try:
                    t = proc.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
            values[name] = total
        m = psutil.cpu_times()
        values["machine"] = m.user + m.nice + m.system + getattr(m, "irq", 0.0) + getattr(m, "softirq", 0.0) + getattr(m, "steal", 0.0)
        self.times.append(time.monotonic())
        for name, value in values.items():
            self.series[name].append(value)

    def at(self, name: str, t: float) -> float:
        series, times = self.series[name], self.times
        i = min(max(bisect.bisect_left(times, t), 1), len(times) - 1)
        t0, t1 = times[i - 1], times[i]
        f = min(1.0, max(0.0, (t - t0) / (t1 - t0))) if t1 > t0 else 0.0
        return series[i - 1] + f * (series[i] - series[i - 1])

    def between(self, name: str, t0: float, t1: float) -> float:
        return self.at(name, t1) - self.at(name, t0)


# ---- coalescing off and on ---------------------------------------------------------------


def _coalescing(ctx: Any, pool: LoadPool, rounds: int) -> tuple[Table, dict[str, dict[str, float]], int]:
    streams, deltas, delay_ms = 10, 400, 1
    sides = {"off": 0, "on": 5}
    found: dict[str, list[tuple[float, float]]] = {side: [] for side in sides}
    lost = 0
    chunks = [f"t{k}." for k in range(deltas)]
    daemons = {side: Daemon(ctx.dir(f"streaming-coalesce-{ms}"), daemon_config() + f"\n[defaults]\ncoalesce_ms = {ms}\n")
               for side, ms in sides.items()}
    try:
        for daemon in daemons.values():
            daemon.start()
        for r in range(rounds):  # rounds alternate between the daemons: drift hits both alike
            for side, daemon in daemons.items():
                conversations = [f"co{r}-{i}" for i in range(streams)]
                jobs = [ScriptedJob(daemon.endpoint, conversations[p::PROCESSES], chunks, delay_ms) for p in range(PROCESSES)]
                with Sampler({"daemon": [daemon.ps.pid]}) as sampler:
                    go, reports = pool.run(jobs)
                end = max(rep.finished_s for rep in reports)
                summaries = [s for rep in reports for s in rep.streams]
                lost += streams * deltas - sum(s.deltas for s in summaries if s.complete)
                cpu_us = sampler.between("daemon", go, end) / (streams * deltas) * 1e6
                found[side].append((cpu_us, statistics.mean(s.events for s in summaries)))
    finally:
        for daemon in daemons.values():
            daemon.stop()
    figures = {side: {"cpu_us": statistics.median(x[0] for x in rows), "events": statistics.median(x[1] for x in rows)}
               for side, rows in found.items()}
    off = figures["off"]["cpu_us"]
    rows = [[f"coalesce_ms = {ms}", fmt(figures[side]["cpu_us"], 1), fmt_ratio(ratio(figures[side]["cpu_us"], off)),
             fmt(figures[side]["events"], 1)] for side, ms in sides.items()]
    table = Table(f"Coalescing off and on: {streams} streams × {deltas} scripted deltas {delay_ms} ms apart, median of {rounds} round(s)",
                  ["daemon", "daemon CPU per delta, µs", "÷ off", "delta events per stream"], rows,
                  note="Two daemons side by side, rounds alternating; CPU over the whole round (the generations' start and commit included).")
    return table, figures, lost


# ---- delivery at 50 deltas/s a stream -------------------------------------------------------


def _deliver(daemon: Daemon, pool: LoadPool, n: int, deltas: int) -> dict[str, Any]:
    stamp = time.monotonic_ns()
    chunks = [f"{k}." for k in range(deltas)]
    ramp_s = max(0.5, n * FORK_PACE_S)
    margin_s = 1.0
    jobs = []
    for p in range(min(PROCESSES, n)):
        mine = list(range(p, n, PROCESSES))
        offsets = [i * ramp_s / n for i in mine]
        jobs.append(ScriptedJob(daemon.endpoint, [f"d{n}-{stamp}-{i}" for i in mine], chunks, CHUNK_DELAY_MS, offsets_s=offsets,
                                delays_ms=[int((ramp_s - o + margin_s) * 1000) for o in offsets]))
    before = cpu(daemon)
    with Sampler({"daemon": [daemon.ps.pid], "load": pool.pids}) as sampler:
        go, reports = pool.run(jobs)
        daemon.wait_idle(120)  # every worker of the run reaped: its CPU is the zygote's children's
    after = cpu(daemon)
    return _delivery_figures(n, deltas, go, go + ramp_s + margin_s, reports, sampler, workers_cpu_s=after.workers - before.workers)


def _delivery_figures(n: int, deltas: int, go: float, start: float, reports: list[ScriptedReport], sampler: Sampler, *,
                      workers_cpu_s: float) -> dict[str, Any]:
    """`start`: when every stream was to send its first delta (each generation's scripted delay ends then)."""
    streams = [s for rep in reports for s in rep.streams]
    bins: Counter[int] = Counter()
    events: Counter[int] = Counter()
    for rep in reports:
        bins.update(rep.delta_bins)
        events.update(rep.event_bins)
    delivered = sum(bins.values())
    keys = sorted(bins)
    # the middle 80 % of all deltas: from the bin in which a tenth had arrived to the one in which nine tenths had
    cumulative, lo, hi = 0, keys[0], keys[-1]
    for key in keys:
        before = cumulative
        cumulative += bins[key]
        if before < 0.1 * delivered <= cumulative:
            lo = key
        if before < 0.9 * delivered <= cumulative:
            hi = key
    t0, t1 = lo * BIN_S, (hi + 1) * BIN_S
    in_window = sum(v for k, v in bins.items() if lo <= k <= hi)
    events_in_window = sum(v for k, v in events.items() if lo <= k <= hi)
    seconds = t1 - t0
    active = [sum(1 for s in streams if s.events and s.first_s <= t <= s.last_s) for t in _steps(t0, t1, 0.1)]
    firsts = sorted(s.first_s for s in streams if s.events)
    first, last = min(s.first_s for s in streams if s.events), max(s.last_s for s in streams if s.events)
    stall = longest = 0  # consecutive bins, from the streams' start to the last delta, in which none arrived
    for key in range(min(keys[0], int(start / BIN_S)), keys[-1] + 1):
        stall = 0 if bins.get(key) else stall + 1
        longest = max(longest, stall)
    timeline: Counter[int] = Counter()
    for key, count in bins.items():
        timeline[int((key * BIN_S - go) * 10)] += count  # per 100 ms since go
    return {
        "n": n,
        "coalesce_ms": 5,
        "offered": n * 1000 / CHUNK_DELAY_MS,
        # sustained: every delta, from the moment the streams were to start (not the first arrival: a starved
        # daemon relays none for seconds, then floods) to the last delta's arrival
        "rate": delivered / (last - min(start, first)),
        "window_rate": in_window / seconds,
        "cpu_us": sampler.between("daemon", t0, t1) / in_window * 1e6,
        # the whole run, from the streams' start to the last delta: the generations' commits and a starved stretch included
        "cpu_us_whole": sampler.between("daemon", min(start, first), last) / max(1, delivered) * 1e6,
        "daemon_cores": sampler.between("daemon", t0, t1) / seconds,
        "events_per_delta": events_in_window / in_window,
        "busy": sampler.between("machine", t0, t1) / seconds,
        "load_cores": sampler.between("load", t0, t1) / seconds,
        "workers_cpu_us": workers_cpu_s / max(1, delivered) * 1e6,
        "active_median": statistics.median(active) if active else 0,
        "first_spread_s": firsts[-1] - firsts[0] if firsts else float("nan"),
        "window_s": seconds,
        "window_from_go_s": t0 - go,
        "delivered": delivered,
        "missing": n * deltas - sum(s.deltas for s in streams if s.complete),
        "failed": sum(1 for s in streams if not s.complete),
        "errors": sorted({s.error for s in streams if s.error})[:3],
        "other_kinds": dict(sum((Counter(rep.other_kinds) for rep in reports), Counter())),
        "streaming_s": last - min(start, first),
        "first_delta_after_start_s": first - start,
        "stall_s": longest * BIN_S,
        "timeline": {
            "t": [i / 10 for i in range(min(timeline), max(timeline) + 1)],
            "deltas_per_s": [timeline.get(i, 0) * 10 for i in range(min(timeline), max(timeline) + 1)],
            "cpu_t": [t - go for t in sampler.times[1:]],
            "daemon_cores": _rates(sampler.times, sampler.series["daemon"]),
            "machine_cores": _rates(sampler.times, sampler.series["machine"]),
        },
    }


def _rates(times: list[float], series: list[float]) -> list[float]:
    return [(series[i] - series[i - 1]) / (times[i] - times[i - 1]) if times[i] > times[i - 1] else 0.0 for i in range(1, len(times))]


def _steps(t0: float, t1: float, step: float) -> list[float]:
    count = max(1, int((t1 - t0) / step))
    return [t0 + i * (t1 - t0) / count for i in range(count + 1)]


def _deliver_table(points: list[dict[str, Any]], deltas: int) -> Table:
    rows = []
    for p in points:
        rows.append([
            f"{p['n']}" + (" (coalesce_ms 0)" if p["coalesce_ms"] == 0 else ""), f"{p['offered']:,.0f}",
            f"{p['rate']:,.0f} ({fmt_ratio(p['rate'] / p['offered'])})", fmt(p["stall_s"], 2),
            f"{fmt(p['cpu_us'], 1)} / {fmt(p['cpu_us_whole'], 1)}", fmt(p["daemon_cores"], 2), fmt(p["events_per_delta"], 2),
            fmt(p["workers_cpu_us"], 0), f"{p['busy']:.2f} ({p['load_cores']:.2f})", f"{p['missing']} / {p['failed']}",
        ])
    return Table(
        f"Streams at 50 deltas/s each (scripted, {deltas} deltas a stream, coalesce_ms 5 unless said)",
        ["streams", "offered deltas/s", "delivered deltas/s (÷ offered)", "longest stall, s",
         "daemon CPU per delta, µs: middle 80 % / whole run", "daemon cores", "events per delta", "worker CPU per delta, µs (whole run)",
         "machine cores busy (load processes)", "deltas missing / streams failed"],
        rows,
        note=f"Offered: 1 000 / {CHUNK_DELAY_MS} ms a stream. Each load process reads its streams off one Client. Delivered: "
             "every delta over the time from the streams' start (when each generation's scripted delay ended) to the last delta's "
             "arrival; the longest stall is the longest time in it with no delta arriving. The daemon's CPU (sampled every 50 ms), "
             "events per delta and cores busy are over the middle 80 % of the deltas (from a tenth of them in to nine tenths), "
             "the daemon's also over the whole run (the commits of the generations and any starved stretch included); a worker's "
             "CPU is over its whole run (its start-up included).",
    )


# ---- added latency ----------------------------------------------------------------------------


def _latency(ctx: Any, pool: LoadPool, points: list[int], *, pieces: int, rounds: int) -> dict[int, dict[str, dict[str, Any]]]:
    if str(REPO / "tests") not in sys.path:
        sys.path.append(str(REPO / "tests"))  # tests/openai_server.py: the fake model server
    from openai_server import FakeOpenAI, text

    per_slot = 2
    found: dict[int, dict[str, list[StreamTrace]]] = {n: {"direct": [], "off": [], "on": []} for n in points}
    written: dict[int, dict[str, dict[str, float]]] = {n: {"direct": {}, "off": {}, "on": {}} for n in points}  # piece → write time
    lost: dict[int, dict[str, int]] = {n: {"direct": 0, "off": 0, "on": 0} for n in points}
    busy: dict[int, dict[str, list[tuple[float, float, float]]]] = {n: {"direct": [], "off": [], "on": []} for n in points}
    with FakeOpenAI(record_chunk_times=True) as fake:
        backend = (f'\n[backends.local]\nkind = "openai"\nbase_url = "{fake.base_url}"\nmodel = "test-model"\n'
                   "timeout_ms = 60000\nstream = true\n")
        max_n = max(points)
        daemons = {side: Daemon(ctx.dir(f"streaming-latency-{side}"), daemon_config(spares=8, max_active=max_n + 16, max_queued=max_n + 64)
                                + backend + f"\n[defaults]\ncoalesce_ms = {ms}\n") for side, ms in (("off", 0), ("on", 5))}
        try:
            for daemon in daemons.values():
                daemon.start()
            order = ["direct", "on", "off"]
            for r in range(rounds):
                for n in points:
                    for side in order[r % 3:] + order[: r % 3]:  # the order turns each round
                        print(f"[streaming] latency: {side}, {n} streams, round {r + 1} …", file=sys.stderr, flush=True)
                        length_s = pieces * CHUNK_DELAY_MS / 1000
                        slots = [[f"l{r}-{n}-{side}-{i}-{j}" for j in range(per_slot)] for i in range(n)]
                        for i in range(n):
                            for j in range(per_slot):
                                uid = f"{side[0]}{r}n{n}s{i}j{j}"
                                fake.reply(text("".join(ps := [f"{uid}-{k} " for k in range(pieces)]), chunks=ps,
                                                chunk_delay_s=CHUNK_DELAY_MS / 1000))
                        offsets = [i * length_s / n for i in range(n)]
                        jobs = []
                        for p in range(min(PROCESSES, n)):
                            common: dict[str, Any] = dict(slots=slots[p::PROCESSES], offsets_s=offsets[p::PROCESSES])
                            if side == "direct":
                                jobs.append(LatencyJob("direct", base_url=fake.base_url, **common))
                            else:
                                jobs.append(LatencyJob("genvisor", endpoint=daemons[side].endpoint, **common))
                        pids = {"load": pool.pids, "daemon": [daemons[side].ps.pid] if side != "direct" else []}
                        with Sampler(pids) as sampler:
                            go, reports = pool.run(jobs)
                        end = sampler.times[-1]
                        machine, load, relay = (sampler.between(name, go, end) / (end - go) for name in ("machine", "load", "daemon"))
                        busy[n][side].append((machine, load, relay))
                        if fake.pending:
                            raise RuntimeError(f"{fake.pending} queued replies were not taken ({side}, {n} streams)")
                        assert fake.chunk_times is not None
                        sent = dict(fake.chunk_times)
                        fake.chunk_times.clear()
                        traces = [t for report in reports for t in report.traces]
                        lost[n][side] += _check(traces, sent, pieces)
                        found[n][side] += [t for t in traces if t.index >= 1 and t.error is None]
                        written[n][side].update(sent)
                    for daemon in daemons.values():
                        daemon.wait_idle(60)
        finally:
            for daemon in daemons.values():
                daemon.stop()
        if fake.server_errors:
            raise RuntimeError(f"FakeOpenAI handler errors: {fake.server_errors[0]}")
    return {n: {side: _latency_figures(found[n][side], written[n][side], lost[n][side]) | _cores(busy[n][side])
                for side in ("direct", "off", "on")} for n in points}


def _cores(rounds: list[tuple[float, float, float]]) -> dict[str, float]:
    """The cores busy while a side ran (median of its rounds): the machine's, the readers', the daemon's."""
    return {key: statistics.median(r[i] for r in rounds) for i, key in enumerate(("machine_cores", "load_cores", "daemon_cores"))}


def _pieces(text: str) -> list[str]:
    return [piece + " " for piece in text.split(" ")[:-1]]


def _check(traces: list[StreamTrace], sent: dict[str, float], pieces: int) -> int:
    """Deltas missing from `traces`: each stream must have every piece its reply had, in
    order, and (through genvisor) its deltas joined must be its result's text."""
    missing = 0
    for trace in traces:
        got = [piece for text, _ in trace.arrivals for piece in _pieces(text)]
        joined = "".join(text for text, _ in trace.arrivals)
        if trace.error is not None or joined != trace.text or len(got) != pieces or any(p not in sent for p in got):
            missing += pieces - sum(1 for p in got if p in sent)
            trace.error = trace.error or f"{len(got)} of {pieces} pieces, joined text {'==' if joined == trace.text else '!='} result"
    return missing


def _latency_figures(traces: list[StreamTrace], sent: dict[str, float], lost: int) -> dict[str, Any]:
    latencies = sorted((t - sent[piece]) * 1000 for trace in traces for text, t in trace.arrivals for piece in _pieces(text))
    ttfd = sorted((trace.arrivals[0][1] - trace.requested_s) * 1000 for trace in traces if trace.arrivals)
    return {
        "streams": len(traces),
        "deltas": len(latencies),
        "p50": percentile(latencies, 0.50),
        "p90": percentile(latencies, 0.90),
        "p99": percentile(latencies, 0.99),
        "max": latencies[-1] if latencies else float("nan"),
        "ttfd_p50": percentile(ttfd, 0.50),
        "ttfd_p99": percentile(ttfd, 0.99),
        "missing": lost,
        "samples": latencies,
    }


def _latency_table(latency: dict[int, dict[str, dict[str, Any]]]) -> Table:
    rows = []
    names = {"direct": "direct (openai SDK)", "off": "genvisor, coalesce_ms 0", "on": "genvisor, coalesce_ms 5 (default)"}
    for n, point in latency.items():
        direct = point["direct"]
        for side in ("direct", "off", "on"):
            s = point[side]
            added = "–" if side == "direct" else f"+{s['p50'] - direct['p50']:.2f} / +{s['p99'] - direct['p99']:.2f}"
            ttfd_added = "–" if side == "direct" else f"+{s['ttfd_p50'] - direct['ttfd_p50']:.2f}"
            cores = f"{s['machine_cores']:.2f} ({s['load_cores']:.2f}" + (f", daemon {s['daemon_cores']:.2f})" if side != "direct" else ")")
            rows.append([str(n), names[side], f"{s['streams']} / {s['deltas']}", fmt(s["p50"], 2), fmt(s["p90"], 2), fmt(s["p99"], 2),
                         added, fmt(s["ttfd_p50"], 2), fmt(s["ttfd_p99"], 2), ttfd_added, cores, str(s["missing"])])
    return Table(
        "Per-delta latency (arrival − the server's write), ms, and time to first delta, ms: the same fake model server, "
        "50 pieces/s a stream",
        ["streams", "reader", "streams / deltas measured", "p50", "p90", "p99", "added p50 / p99", "first delta p50", "first delta p99",
         "added first delta p50", "machine cores busy (readers…)", "deltas missing"],
        rows,
        note="Each slot runs 2 streams back to back; the second ones (started while the others ran) are measured. "
             "Added: genvisor's percentile minus direct's. Cores: while the side ran (the fake server is in the scenario's "
             "process: in the machine's figure only).",
    )


# ---- plots -----------------------------------------------------------------------------


def _plot(path: Path, deliver: list[dict[str, Any]], latency: dict[int, dict[str, dict[str, Any]]]) -> None:
    with figure(path, ncols=2, width=5.5, height=4) as (left, right):
        if deliver:
            ns = [p["n"] for p in deliver]
            left.plot(ns, [p["offered"] for p in deliver], linestyle=":", color="grey", marker=".", label="offered (50/s a stream)")
            left.plot(ns, [p["rate"] for p in deliver], marker="o", label="delivered")
            left.set_xscale("log")
            left.set_yscale("log")
            left.set_xlabel("concurrent streams")
            left.set_ylabel("deltas/s")
            left.set_title("deltas delivered (scripted, coalesce_ms 5)")
            left.grid(True, which="both", alpha=0.3)
            left.legend(fontsize=7)
        if latency:
            ns = sorted(latency)
            for side, colour in (("on", "tab:blue"), ("off", "tab:orange")):
                for q, style in (("p50", "-"), ("p99", "--")):
                    right.plot(ns, [latency[n][side][q] - latency[n]["direct"][q] for n in ns], linestyle=style, marker="o", color=colour,
                               label=f"coalesce_ms {5 if side == 'on' else 0}, {q}")
            right.axhline(2, color="grey", linestyle=":", linewidth=1)
            right.axhline(10, color="grey", linestyle=":", linewidth=1)
            right.set_xscale("log")
            right.set_yscale("symlog", linthresh=1)  # a few ms at 10 streams, seconds on a saturated machine
            right.set_ylim(bottom=0)
            right.set_xlabel("concurrent streams")
            right.set_ylabel("ms added per delta (genvisor − direct)")
            right.set_title("added latency (targets: p50 2 ms, p99 10 ms)")
            right.grid(True, which="both", alpha=0.3)
            right.legend(fontsize=7)


def _plot_timeline(path: Path, point: dict[str, Any]) -> None:
    line = point["timeline"]
    with figure(path, width=8, height=4) as ax:
        ax.plot(line["t"], line["deltas_per_s"], label="deltas/s delivered (100 ms bins)")
        ax.axhline(point["offered"], color="grey", linestyle=":", label=f"offered {point['offered']:,.0f}/s")
        ax.set_xlabel("s since the first generation was started")
        ax.set_ylabel("deltas/s")
        ax.set_title(f"{point['n']} streams at 50 deltas/s: delivery over time")
        cores = ax.twinx()
        cores.plot(line["cpu_t"], line["daemon_cores"], color="tab:red", linewidth=0.8, label="daemon, cores")
        cores.plot(line["cpu_t"], line["machine_cores"], color="tab:green", linewidth=0.8, label="machine busy, cores")
        cores.set_ylabel("cores")
        cores.set_ylim(0, psutil.cpu_count() * 1.1)
        handles = ax.get_legend_handles_labels()[0] + cores.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=4)
        ax.grid(True, alpha=0.3)


def _plot_cdf(path: Path, latency: dict[int, dict[str, dict[str, Any]]]) -> None:
    n = 100 if 100 in latency else max(latency)
    with figure(path, width=7, height=4) as ax:
        for side, label in (("direct", "direct (openai SDK)"), ("off", "genvisor, coalesce_ms 0"), ("on", "genvisor, coalesce_ms 5")):
            samples = latency[n][side]["samples"]
            if samples:
                ax.plot(samples, [(i + 1) / len(samples) for i in range(len(samples))], label=label)
        ax.set_xscale("log")
        ax.set_xlabel("ms from the server's write to the reader")
        ax.set_ylabel("fraction of deltas")
        ax.set_title(f"per-delta latency, {n} concurrent streams")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)


# ---- standalone ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (10 and 100 streams, shorter streams, one round)")
    parser.add_argument("--part", action="append", choices=PARTS, help="run only this part (repeatable)")
    parser.add_argument("--streams", type=int, action="append", help="the `deliver` part at this many streams (repeatable)")
    parser.add_argument("--out", type=Path, help="where the plots go (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    from bench.run import standalone

    return standalone("streaming", lambda ctx: run(ctx, tuple(args.part or PARTS), args.streams), quick=args.quick, out=args.out)


if __name__ == "__main__":
    raise SystemExit(main())
