"""The directories systemd makes for the service: RuntimeDirectory= and StateDirectory=.

systemd creates them owned by the service's user and passes their paths as
$RUNTIME_DIRECTORY and $STATE_DIRECTORY (colon-separated when a unit names several;
the first is ours). The daemon's defaults use them; the client's do not, as a client
inside some other service would find that service's runtime directory, not ours.
"""

from __future__ import annotations

import os
from pathlib import Path


def runtime_directory() -> Path | None:
    return _first("RUNTIME_DIRECTORY")


def state_directory() -> Path | None:
    return _first("STATE_DIRECTORY")


def _first(variable: str) -> Path | None:
    value = os.environ.get(variable, "").split(":")[0]
    return Path(value) if value else None
