"""`python -m bench.check [RESULTS_DIR] [--strict]` (`make bench-check`): hold a run
against bench/thresholds.toml.

Limits are regression gates, mostly ratios to peers measured in the same run, so a
noisy machine does not trip them: any limit broken → exit 1 with the list. Targets are
issue 7's absolute goals: reported met or missed, and gating only with --strict.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any

import msgspec

THRESHOLDS = Path(__file__).resolve().parent / "thresholds.toml"
RESULTS = Path(__file__).resolve().parent / "results"


def load_thresholds(path: Path = THRESHOLDS) -> dict[str, list[dict[str, Any]]]:
    return tomllib.loads(path.read_text())


def evaluate(run: Any, thresholds: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One line per threshold: its value in `run` (a bench.report.Run), bound and status."""
    metrics: dict[str, float] = {}
    ran: set[str] = set()
    failed: set[str] = set()
    for result in run.results:
        metrics.update(result.metrics)
        ran.add(result.name)
        if result.error:
            failed.add(result.name)
    lines = []
    for kind in ("target", "limit"):
        for t in thresholds.get(kind, []):
            scenario = t["metric"].split(".")[0]
            value = metrics.get(t["metric"])
            bound = f"≤ {t['max']}" if "max" in t else f"≥ {t['min']}"
            if scenario not in ran:
                status = "not run"
            elif value is None or value != value:
                status = "missing" if scenario not in failed else "scenario failed"
            else:
                ok = value <= t["max"] if "max" in t else value >= t["min"]
                status = ("met" if ok else "missed") if kind == "target" else ("ok" if ok else "REGRESSION")
            lines.append({
                "kind": kind, "metric": t["metric"], "what": t["what"], "bound": bound, "status": status,
                "value": "–" if value is None else f"{value:.3g}",
            })
    return lines


def failures(lines: list[dict[str, Any]], strict: bool) -> list[dict[str, Any]]:
    bad = {"REGRESSION", "missing", "scenario failed"}
    return [c for c in lines if c["status"] in bad or (strict and c["status"] == "missed")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", type=Path, default=RESULTS / "latest", help="a results folder (default: the latest run)")
    parser.add_argument("--strict", action="store_true", help="a missed target fails too")
    parser.add_argument("--thresholds", type=Path, default=THRESHOLDS)
    args = parser.parse_args(argv)
    path = args.results / "results.json"
    if not path.exists():
        print(f"bench-check: no results at {path}; run `make bench` first", file=sys.stderr)
        return 2
    from bench.report import Run

    run = msgspec.json.decode(path.read_bytes(), type=Run)
    lines = evaluate(run, load_thresholds(args.thresholds))
    width = max(len(c["metric"]) for c in lines)
    for c in lines:
        print(f"{c['status']:>15}  {c['kind']:<6} {c['metric']:<{width}}  {c['value']:>8} {c['bound']:<10} {c['what']}")
    bad = failures(lines, args.strict)
    if bad:
        print(f"\nbench-check: {len(bad)} failing of {len(lines)} ({path.parent.name}):", file=sys.stderr)
        for c in bad:
            print(f"  {c['metric']} = {c['value']} (bound {c['bound']}: {c['what']}) — {c['status']}", file=sys.stderr)
        return 1
    print(f"\nbench-check: all {len(lines)} limits hold ({path.parent.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
