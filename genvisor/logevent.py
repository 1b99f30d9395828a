"""Structured log events, for every room: a name and typed fields, one line each.

How a line looks (text, JSON, journald) is the daemon's choice (see daemon.logs);
code that logs only says what happened.
"""

from __future__ import annotations

import logging
import time
from typing import Any

FIELDS_ATTRIBUTE = "genvisor_fields"  # the LogRecord attribute that carries an event's fields


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log the event `name` with `fields` (values: str, numbers, bools, None, lists)."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={FIELDS_ATTRIBUTE: fields})


class RateLimit:
    """At most one line per `interval_s` for a noisy event; the next line that gets
    through says how many were held back (`suppressed`)."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self._interval_s = interval_s
        self._next_at = 0.0
        self._held = 0

    def allow(self) -> int | None:
        """None: hold this one back. Else how many were held back before it."""
        now = time.monotonic()
        if now < self._next_at:
            self._held += 1
            return None
        self._next_at = now + self._interval_s
        held, self._held = self._held, 0
        return held
