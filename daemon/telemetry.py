"""Run telemetry with fixed cardinality.

Every run emits exactly one `run_started` and exactly one `run_finished`, whatever
happens to it. Label values come from closed sets — registered modes, configured
backends, the three outcomes, the error categories — never from ids, so the number
of series cannot grow with traffic.
"""

from __future__ import annotations

import collections
from typing import get_args

from genvisor.errors import LLMErrorCategory
from genvisor.ipc.frames import TelemetryCount

OUTCOMES = ("completed", "failed", "canceled")
CATEGORIES = (*get_args(LLMErrorCategory), "none")


class Telemetry:
    def __init__(self, *, modes: list[str], backends: list[str]) -> None:
        self._modes = frozenset(modes)
        self._backends = frozenset(backends)
        self._counts: collections.Counter[tuple[str, str, str, str, str]] = collections.Counter()

    def run_started(self, mode: str, backend: str) -> None:
        self._counts["run_started", self._mode(mode), self._backend(backend), "", ""] += 1

    def run_finished(self, mode: str, backend: str, outcome: str, category: str | None) -> None:
        assert outcome in OUTCOMES
        label = category if category in CATEGORIES else "none" if category is None else "unknown"
        self._counts["run_finished", self._mode(mode), self._backend(backend), outcome, label] += 1

    def snapshot(self) -> list[TelemetryCount]:
        return [TelemetryCount(*key, count=n) for key, n in sorted(self._counts.items())]

    def _mode(self, mode: str) -> str:
        return mode if mode in self._modes else "other"

    def _backend(self, backend: str) -> str:
        return backend if backend in self._backends else "unknown"
