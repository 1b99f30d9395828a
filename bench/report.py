"""What a scenario hands back, and how a run becomes results.json, results.md and PNGs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec


class Table(msgspec.Struct):
    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""


class Result(msgspec.Struct):
    name: str
    seconds: float = 0.0
    tables: list[Table] = []
    metrics: dict[str, float] = {}  # flat, "scenario.what": what thresholds.toml checks
    plots: list[str] = []  # PNG file names in the run's folder
    notes: list[str] = []
    data: dict[str, Any] = {}  # the summaries behind the tables, for later analysis
    error: str | None = None  # the scenario failed; its traceback


class Run(msgspec.Struct):
    started_utc: str
    quick: bool
    machine: dict[str, Any]
    results: list[Result]
    seconds: float = 0.0
    checks: list[dict[str, Any]] = []


def markdown(run: Run) -> str:
    mode = "quick" if run.quick else "full"
    cpu = run.machine.get("cpus")
    out = [
        f"# genvisor bench — {run.started_utc} ({mode}, {run.seconds:.0f} s, {cpu} CPUs, load {run.machine.get('load')})",
        "",
        "Every figure is from this one run; peers ran side by side with genvisor. On a shared",
        "machine absolute times drift between runs: compare the ratios.",
        "",
    ]
    if run.checks:
        out += ["## Targets and limits", "", "| kind | metric | value | bound | status |", "|---|---|---|---|---|"]
        for c in run.checks:
            out.append(f"| {c['kind']} | {c['metric']} — {c['what']} | {c['value']} | {c['bound']} | {c['status']} |")
        out.append("")
    for result in run.results:
        out += [f"## {result.name} ({result.seconds:.0f} s)", ""]
        if result.error:
            out += ["Failed:", "", "```", result.error.strip(), "```", ""]
        for table in result.tables:
            out += table_markdown(table)
        out += [f"- {note}" for note in result.notes]
        out += [f"![{plot}]({plot})" for plot in result.plots]
        out.append("")
    return "\n".join(out) + "\n"


def table_markdown(table: Table) -> list[str]:
    lines = [f"**{table.title}**", "", "| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in table.rows]
    if table.note:
        lines += ["", table.note]
    lines.append("")
    return lines


@contextlib.contextmanager
def figure(path: Path, *, ncols: int = 1, width: float = 7.0, height: float = 4.0) -> Iterator[Any]:
    """A matplotlib figure (headless) saved to `path` on exit; yields its axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols if ncols > 1 else width, height), squeeze=False)
    try:
        yield axes[0] if ncols > 1 else axes[0][0]
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
