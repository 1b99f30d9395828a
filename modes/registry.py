"""The modes a conversation can be in: `coding` and `planning` built in, more through
the `genvisor.modes` entry-point group (each entry point names a `Mode` object).

A mode (`modes.protocol.Mode`) says who it is (`info`), checks its configuration
(`validate` → diagnostics, empty when valid), assembles a run's spec (`assemble`) and
builds the state machine of one run (`new_run`).
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

from genvisor.modes.coding import CodingMode
from genvisor.modes.planning import PlanningMode
from genvisor.modes.protocol import Mode
from genvisor.types import ModeInfo

log = logging.getLogger("genvisor.modes")
ENTRY_POINT_GROUP = "genvisor.modes"


def _load() -> dict[str, Mode]:
    modes: dict[str, Mode] = {"coding": CodingMode(), "planning": PlanningMode()}
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
