"""`python -m bench [--quick] [--only SCENARIO ...] [--out DIR]`: run the scenarios,
write results.json, results.md and the plots, and point bench/results/latest at them."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from bench import check
from bench.report import Result, Run, markdown, table_markdown

RESULTS = Path(__file__).resolve().parent / "results"
# In this order: queue_depth offers load relative to the capacity throughput measured.
# ray starts a two-node Ray cluster of its own: last, so that it loads no other scenario.
SCENARIOS = ["latency", "throughput", "queue_depth", "cancellation", "memory", "scale", "streaming", "ray"]


class Context:
    """What a scenario gets: its size, a scratch dir, the run's folder, and what earlier
    scenarios of the run found (`shared`, e.g. the measured capacity)."""

    def __init__(self, *, quick: bool, out: Path, scratch: Path) -> None:
        self.quick = quick
        self.out = out
        self.scratch = scratch
        self.shared: dict[str, float] = {}

    def n(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def dir(self, name: str) -> Path:
        path = self.scratch / name
        path.mkdir(parents=True, exist_ok=True)
        return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts, for development (≈1 min)")
    parser.add_argument("--only", action="append", choices=SCENARIOS, metavar="SCENARIO",
                        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}")
    parser.add_argument("--out", type=Path, help="results folder (default bench/results/<UTC time>)")
    args = parser.parse_args(argv)

    started = datetime.now(UTC)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    out = args.out or RESULTS / stamp
    out.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in SCENARIOS if not args.only or s in args.only]
    begin = time.perf_counter()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="genvisor-bench-") as scratch:
        ctx = Context(quick=args.quick, out=out, scratch=Path(scratch))
        for name in chosen:
            print(f"[bench] {name} …", file=sys.stderr, flush=True)
            results.append(_run_scenario(name, ctx))
            print(f"[bench] {name} done in {results[-1].seconds:.1f} s", file=sys.stderr, flush=True)
    run = Run(
        started_utc=stamp,
        quick=args.quick,
        machine={"cpus": os.cpu_count(), "load": " ".join(f"{x:.2f}" for x in os.getloadavg()), "python": sys.version.split()[0]},
        results=results,
        seconds=time.perf_counter() - begin,
    )
    run.checks = check.evaluate(run, check.load_thresholds())
    (out / "results.json").write_bytes(msgspec.json.format(msgspec.json.encode(run)))
    (out / "results.md").write_text(markdown(run))
    if out.resolve().parent == RESULTS.resolve():
        latest = RESULTS / "latest"
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(out.name)
    print(markdown(run))
    print(f"[bench] results in {out}", file=sys.stderr)
    return 1 if any(r.error for r in results) else 0


def standalone(name: str, scenario: Callable[[Context], Result], *, quick: bool, out: Path | None) -> int:
    """One scenario on its own (`python -m bench.NAME`): its tables, notes and flat
    figures printed; its plots in `out` (else a temp dir, removed)."""
    with tempfile.TemporaryDirectory(prefix=f"genvisor-{name}-") as scratch:
        plots = out or Path(scratch) / "out"
        plots.mkdir(parents=True, exist_ok=True)
        result = scenario(Context(quick=quick, out=plots, scratch=Path(scratch)))
    for table in result.tables:
        print("\n".join(table_markdown(table)))
    for note in result.notes:
        print(f"- {note}")
    for metric, value in sorted(result.metrics.items()):
        print(f"{metric} = {value:.4g}")
    if out:
        print(f"plots in {out}", file=sys.stderr)
    return 1 if result.error else 0


def _run_scenario(name: str, ctx: Context) -> Result:
    begin = time.perf_counter()
    try:
        result = importlib.import_module(f"bench.{name}").run(ctx)
    except Exception:  # noqa: BLE001 — one broken scenario must not lose the others
        result = Result(name=name, error=traceback.format_exc())
    result.seconds = time.perf_counter() - begin
    return result
