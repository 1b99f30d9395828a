"""What a run may ask of the process it runs in: the one thing that differs between
the executors, handed to the run by the executor that runs it.

A worker process is the run's own: blocking work may run inline on its loop, and a
crash is a real one. In-process, the loop is the daemon's: blocking work goes to a
thread, a crash is an exception the executor reports as a worker's exit would be, and
nothing may be left running behind the run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

T = TypeVar("T")


class HostRefused(Exception):
    """This host cannot do that (e.g. leave a process running outside a worker)."""


class Host(Protocol):
    async def blocking(self, work: Callable[[], T]) -> T:
        """Run `work`, which blocks, without stalling anything but this run."""
        ...

    async def crash(self, kind: str) -> None:
        """End the process the run is in as `kind` says — "exit" (status 3), "signal"
        (SIGKILL), "hang" (deaf to everything but SIGKILL) — or, in-process, the
        exception that stands for it. For tests and fault injection."""
        ...

    def spawn(self, argv: list[str]) -> None:
        """Start `argv` in the run's process group and leave it running (the run's
        teardown must kill it); HostRefused where nothing would."""
        ...
