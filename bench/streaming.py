"""`python -m bench.streaming [--streams 10] [--deltas 400] [--delay-ms 1] [--rounds 3]`:
what relaying a streamed turn costs the daemon, with delta coalescing off and on, side
by side in one run (issue 14's `streaming` scenario, its first part).

Two daemons, one with `[defaults] coalesce_ms = 0`, one with the default 5 ms. Each
round, on each daemon in turn, `--streams` clients each send a turn whose scripted
reply streams `--deltas` deltas `--delay-ms` apart, events on, and read every event.
Printed per daemon (median of the rounds): the daemon's CPU time (user + system) per
delta the model streamed, and the delta events a client received per stream. The
client threads run in this process: at high stream counts they, not the daemon, are
the bottleneck (the issue's 1 000-stream load needs generators in processes of their
own: not built yet).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import Daemon, daemon_config
from genvisor.client import Client
from genvisor.types import GenerationEvent


def one_round(daemon: Daemon, streams: int, deltas: int, delay_ms: int) -> tuple[float, float]:
    """The daemon's CPU µs per streamed delta, and the delta events per stream."""
    received: list[int] = []
    failures: list[BaseException] = []

    def stream(i: int) -> None:
        events: list[GenerationEvent] = []
        chunks = [f"t{k} " for k in range(deltas)]
        try:
            with Client(daemon.endpoint, timeout_ms=60_000) as client:
                _, result = client.send_and_generate(
                    f"s{i}-{time.time_ns()}", "go", on_event=events.append, await_opts={"timeout_ms": 120_000},
                    generation_opts={"backend_opts": {"chunks": chunks, "chunk_delay_ms": delay_ms}},
                )
            assert "".join(e.text or "" for e in events if e.kind == "delta") == result.text == "".join(chunks)
            received.append(sum(1 for e in events if e.kind == "delta"))
        except BaseException as exc:  # noqa: BLE001 — reported by the round, not lost in a thread
            failures.append(exc)

    before = sum(daemon.ps.cpu_times()[:2])
    threads = [threading.Thread(target=stream, args=(i,)) for i in range(streams)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"{len(failures)} of {streams} streams failed: {failures[0]!r}")
    cpu_s = sum(daemon.ps.cpu_times()[:2]) - before
    return cpu_s / (streams * deltas) * 1e6, statistics.mean(received)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--deltas", type=int, default=400)
    parser.add_argument("--delay-ms", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    sides = {"coalesce_ms = 0": 0, "coalesce_ms = 5": 5}
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
    with tempfile.TemporaryDirectory(prefix="genvisor-streaming-") as tmp:
        daemons = {name: Daemon(Path(tmp) / str(ms), daemon_config(spares=4) + f"\n[defaults]\ncoalesce_ms = {ms}\n").start()
                   for name, ms in sides.items()}
        try:
            for _ in range(args.rounds):  # rounds alternate between the daemons: drift hits both alike
                for name, daemon in daemons.items():
                    results[name].append(one_round(daemon, args.streams, args.deltas, args.delay_ms))
        finally:
            for daemon in daemons.values():
                daemon.stop()
    print(f"{args.streams} streams × {args.deltas} deltas, {args.delay_ms} ms apart; median of {args.rounds} rounds")
    figures = {name: (statistics.median(r[0] for r in rounds), statistics.median(r[1] for r in rounds)) for name, rounds in results.items()}
    for name, (cpu_us, events) in figures.items():
        print(f"  {name:16} daemon CPU {cpu_us:7.1f} µs per delta   {events:7.1f} delta events per stream")
    off, on = figures["coalesce_ms = 0"][0], figures["coalesce_ms = 5"][0]
    print(f"  coalescing on ÷ off: {on / off:.2f}× the daemon's CPU per delta (issue 14's target: ≤ 10 µs per delta)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
