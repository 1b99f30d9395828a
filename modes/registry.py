"""The modes a conversation can be in: `coding` built in, more through the
`genvisor.modes` entry-point group (each entry point names a `Mode` object).

A mode says who it is (`info`), checks its configuration (`validate` → diagnostics,
empty when valid) and builds the state machine of one run (`new_run`).
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any, Protocol

from genvisor.errors import Diagnostic
from genvisor.modes.coding import CodingRun
from genvisor.modes.llm import DEFAULT_MAX_STEPS, DEFAULT_MAX_TOOL_CALLS, RunSpec
from genvisor.types import ModeInfo

log = logging.getLogger("genvisor.modes")
ENTRY_POINT_GROUP = "genvisor.modes"


class Mode(Protocol):
    info: ModeInfo

    def validate(self, mode_state: dict[str, Any]) -> list[Diagnostic]: ...

    def new_run(self, spec: RunSpec) -> CodingRun: ...


class CodingMode:
    info = ModeInfo(
        id="coding",
        summary="Assemble context, call the model, run its tool calls, feed results back, commit the reply.",
        capabilities=["llm", "tools", "streaming", "cancel"],
        required_options=[],
        optional_options=["max_steps", "max_tool_calls", "system_prompt"],
        defaults={"max_steps": DEFAULT_MAX_STEPS, "max_tool_calls": DEFAULT_MAX_TOOL_CALLS, "system_prompt": None},
        stability="stable",
        version="1",
    )
    _types = {"max_steps": int, "max_tool_calls": int, "system_prompt": str}

    def validate(self, mode_state: dict[str, Any]) -> list[Diagnostic]:
        problems = []
        for key, value in mode_state.items():
            expected = self._types.get(key)
            if expected is None:
                problems.append(Diagnostic("unknown_option", f"/{key}", f"coding has no option {key!r} (options: {', '.join(self._types)})"))
            elif not isinstance(value, expected) or isinstance(value, bool):
                problems.append(Diagnostic("invalid_type", f"/{key}", f"{key} must be {expected.__name__}"))
            elif key in ("max_steps", "max_tool_calls") and not 1 <= value <= 256:
                problems.append(Diagnostic("out_of_range", f"/{key}", f"{key} must be within 1..256"))
        return problems

    def new_run(self, spec: RunSpec) -> CodingRun:
        return CodingRun(spec)


def _load() -> dict[str, Mode]:
    modes: dict[str, Mode] = {"coding": CodingMode()}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            mode = entry.load()
            mode_id = mode.info.id
        except Exception:  # noqa: BLE001 — a broken plug-in must not break the daemon
            log.exception("mode entry point %s could not be loaded", entry.name)
            continue
        if mode_id in modes:
            log.warning("mode %r from entry point %s ignored: already registered", mode_id, entry.name)
            continue
        modes[mode_id] = mode
    return modes


_MODES: dict[str, Mode] | None = None


def registry() -> dict[str, Mode]:
    """Registered modes, `coding` first, the rest in id order (loaded once)."""
    global _MODES
    if _MODES is None:
        loaded = _load()
        _MODES = {"coding": loaded.pop("coding"), **dict(sorted(loaded.items()))}
    return _MODES


def supported_modes() -> list[ModeInfo]:
    return [mode.info for mode in registry().values()]
