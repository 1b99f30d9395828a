"""A short run of the long fuzz run of whole turns (bench/fuzz_runs.py; its full run is
`python -m bench.fuzz_runs --n 10000`): generated options, model replies and tool
arguments through a real daemon, every request answered with a typed result or a typed
error, every run ended once, and nothing left behind or changed by a restart."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # bench/ is importable from the repo root, not installed

from bench.fuzz_runs import FAMILIES, MUST_BE_ZERO, run  # noqa: E402


def _summary(result) -> str:
    lines = [f"{name}: {value}" for name, value in result["figures"].items() if name in MUST_BE_ZERO and value]
    for failure in result["failures"][:5]:
        lines.append(f"case {failure['number']}: " + " | ".join(p.splitlines()[-1][:300] for p in failure["problems"]))
        lines.append(f"  {failure['case']!r:.2000}")
    lines += result["exits"][:2]
    if result["restart"].get("why"):
        lines.append(result["restart"]["why"])
    return "\n".join(lines)


def test_generated_options_replies_and_tool_arguments_are_all_answered():
    result = run(150, 11, threads=2, quiet=True)
    figures = result["figures"]
    assert figures["cases"] == 150
    assert all(figures[f"  {family}"] > 0 for family in FAMILIES), figures
    assert figures["generations"] > 100, figures
    assert not {name: figures[name] for name in MUST_BE_ZERO if figures[name]}, _summary(result)
    assert result["clean"], _summary(result)
