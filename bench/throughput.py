"""Scenario 2 — throughput: closed loop with 1, 2, 8, 32 concurrent clients.

Each client starts its next generation when the last returns. Peers run the same
trivial job through a pool of as many one-job processes as there are clients.
"""

from __future__ import annotations

from pathlib import Path

from bench import peers
from bench.harness import Daemon, cpu, daemon_config
from bench.loops import closed_loop, genvisor_caller, peer_caller
from bench.report import Result, Table, figure
from bench.stats import fmt, fmt_ratio, ratio, summarize

CLIENTS = [1, 2, 8, 32]
GENVISOR = "genvisor"


def run(ctx) -> Result:
    seconds = ctx.n(full=4, quick=1)
    rates: dict[str, dict[int, float]] = {GENVISOR: {}}
    p99: dict[str, dict[int, float]] = {GENVISOR: {}}
    errors = 0
    cpu_ms: dict[int, dict[str, float]] = {}
    with Daemon(ctx.dir("throughput"), daemon_config(max_active=64, max_queued=256)) as daemon:
        for clients in CLIENTS:
            # genvisor and its peers back to back at each level, so drift hits them alike
            before = cpu(daemon)
            loop = closed_loop(genvisor_caller(daemon.endpoint, f"tp{clients}"), clients, seconds)
            cpu_ms[clients] = before.per_item_ms(cpu(daemon), loop.completed)
            rates[GENVISOR][clients], p99[GENVISOR][clients] = loop.per_s, summarize(loop.latencies_ms).p99
            errors += loop.errors
            for name in peers.THROUGHPUT_PEERS:
                factory, _ = peers.LATENCY_PEERS[name]
                with factory(clients) as call:
                    loop = closed_loop(peer_caller(call), clients, seconds)
                rates.setdefault(name, {})[clients] = loop.per_s
                p99.setdefault(name, {})[clients] = summarize(loop.latencies_ms).p99
    peak = max(rates[GENVISOR].values())
    best_peer = max(max(r.values()) for name, r in rates.items() if name != GENVISOR)
    ctx.shared["capacity_per_s"] = peak
    columns = ["path", *(f"{c} clients /s" for c in CLIENTS), *(f"{c}: × genvisor" for c in CLIENTS)]
    rows = [[name, *(fmt(r[c], 0) for c in CLIENTS), *(fmt_ratio(ratio(r[c], rates[GENVISOR][c])) for c in CLIENTS)]
            for name, r in rates.items()]
    lat_rows = [[name, *(fmt(q[c], 1) for c in CLIENTS)] for name, q in p99.items()]
    parts = list(cpu_ms[CLIENTS[0]])
    cpu_rows = [[part, *(fmt(cpu_ms[c][part]) for c in CLIENTS)] for part in parts]
    cpu_rows.append(["all", *(fmt(sum(cpu_ms[c].values())) for c in CLIENTS)])
    cpu_rows.append(["→ ceiling on 2 cores, /s", *(fmt(2000 / sum(cpu_ms[c].values()), 0) for c in CLIENTS)])
    _plot(ctx.out / "throughput.png", rates)
    return Result(
        name="throughput",
        tables=[
            Table("Closed-loop throughput, generations (jobs)/s", columns, rows),
            Table("Latency p99 under that load, ms", ["path", *(f"{c} clients" for c in CLIENTS)], lat_rows),
            Table("genvisor CPU per generation by process, ms", ["process", *(f"{c} clients" for c in CLIENTS)], cpu_rows,
                  note="From the kernel's accounting (the workers' is the zygote's reaped children's). Throughput is "
                       "bounded by these CPU-ms on two cores shared with the client and the rest of the machine."),
        ],
        metrics={
            "throughput.peak_per_s": peak,
            "throughput.peak_vs_best_peer": ratio(peak, best_peer),
            "throughput.errors": errors,
            **{f"throughput.c{c}_per_s": rates[GENVISOR][c] for c in CLIENTS},
            "throughput.cpu_ms_per_generation": sum(cpu_ms[8].values()),
        },
        plots=["throughput.png"],
        notes=[f"{seconds} s per level after a warm-up; errors: {errors}."],
        data={"rates": rates, "p99_ms": p99, "cpu_ms": cpu_ms},
    )


def _plot(path: Path, rates: dict[str, dict[int, float]]) -> None:
    with figure(path) as ax:
        for name, r in rates.items():
            ax.plot(CLIENTS, [r[c] for c in CLIENTS], marker="o", label=name, linewidth=2.5 if name == GENVISOR else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(CLIENTS, [str(c) for c in CLIENTS])
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel("completed per second")
        ax.axhline(300, color="grey", linestyle=":", label="target 300/s")
        ax.set_title("Throughput, fresh process per job")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
