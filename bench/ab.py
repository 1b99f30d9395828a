"""`python -m bench.ab PYTHON_A PYTHON_B`: two genvisor installs side by side.

For a change to the daemon: install the tree before it into another venv and compare
(rounds alternate between the two daemons, so drift hits both alike):

    git archive main | tar -x -C /tmp/before && python3 -m venv /tmp/venv-before
    /tmp/venv-before/bin/pip install /tmp/before
    python -m bench.ab /tmp/venv-before/bin/python .venv/bin/python
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.harness import Daemon, cpu, daemon_config
from bench.latency import generations
from bench.loops import closed_loop, genvisor_caller
from bench.stats import fmt, fmt_ratio, ratio, summarize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("python_a")
    parser.add_argument("python_b")
    parser.add_argument("--n", type=int, default=300, help="generations per side for latency")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=2.0, help="per closed-loop round")
    args = parser.parse_args(argv)
    sides = {"A": args.python_a, "B": args.python_b}
    latency: dict[str, list[float]] = {k: [] for k in sides}
    rate: dict[str, list[float]] = {k: [] for k in sides}
    cpu_ms: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
    with tempfile.TemporaryDirectory(prefix="genvisor-ab-") as tmp:
        daemons = {k: Daemon(Path(tmp) / k, daemon_config(), python=py).__enter__() for k, py in sides.items()}
        try:
            for d in daemons.values():
                generations(d, 20, "warm")
            for _ in range(args.rounds):
                for k, d in daemons.items():
                    latency[k] += [(b - a) * 1000 for a, b in generations(d, args.n // args.rounds)]
                    before = cpu(d)
                    loop = closed_loop(genvisor_caller(d.endpoint, "ab"), 8, args.seconds)
                    rate[k].append(loop.per_s)
                    cpu_ms[k].append(before.per_item_ms(cpu(d), loop.completed))
        finally:
            for d in daemons.values():
                d.stop()
    a, b = summarize(latency["A"]), summarize(latency["B"])
    print(f"{'':28} {'A':>9} {'B':>9}  B/A")
    print(f"{'latency p50 ms':28} {fmt(a.p50):>9} {fmt(b.p50):>9}  {fmt_ratio(ratio(b.p50, a.p50))}")
    print(f"{'latency p99 ms':28} {fmt(a.p99):>9} {fmt(b.p99):>9}  {fmt_ratio(ratio(b.p99, a.p99))}")
    ra, rb = summarize(rate["A"]).p50, summarize(rate["B"]).p50
    print(f"{'8 clients, generations/s':28} {fmt(ra, 0):>9} {fmt(rb, 0):>9}  {fmt_ratio(ratio(rb, ra))}")
    for part in cpu_ms["A"][0]:
        pa = summarize([c[part] for c in cpu_ms["A"]]).p50
        pb = summarize([c[part] for c in cpu_ms["B"]]).p50
        print(f"{'CPU ms/gen, ' + part:28} {fmt(pa):>9} {fmt(pb):>9}  {fmt_ratio(ratio(pb, pa))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
