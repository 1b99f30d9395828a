"""Percentiles and ratios: the only arithmetic the scenarios share."""

from __future__ import annotations

import statistics

import msgspec


class Summary(msgspec.Struct, frozen=True):
    n: int
    p50: float
    p90: float
    p99: float
    max: float
    mean: float


def summarize(samples: list[float]) -> Summary:
    if not samples:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan, nan)
    ordered = sorted(samples)
    return Summary(
        n=len(ordered),
        p50=percentile(ordered, 0.50),
        p90=percentile(ordered, 0.90),
        p99=percentile(ordered, 0.99),
        max=ordered[-1],
        mean=statistics.fmean(ordered),
    )


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted samples (no interpolation: with 100
    samples p99 is the 99th, not a blend of the two slowest)."""
    if not ordered:
        return float("nan")
    rank = max(1, -(-int(q * len(ordered) * 1000) // 1000))  # ceil(q·n) without float fuzz
    return ordered[min(len(ordered), rank) - 1]


def ratio(value: float, reference: float) -> float:
    return value / reference if reference else float("nan")


def fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None or value != value:  # None or NaN
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None or value != value else f"{value:.2f}×"
