"""Exclusive ownership of a resource by one process for its lifetime: a `flock` on a
file that also names the holder's pid, so the one refused can say who has it.

The kernel drops the lock when the holder dies, however it dies: a lock left by a
killed daemon never needs cleaning up, and no stale pid file can lock anyone out.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class LockHeld(Exception):
    def __init__(self, path: Path, holder: str) -> None:
        self.path = path
        self.holder = holder  # the holder's pid as it wrote it, or "unknown"
        super().__init__(f"{path} is held by pid {holder}")


def lock_exclusively(path: Path) -> int:
    """Take the lock at `path` (created 0600) and write our pid in it; returns the fd
    that holds it (close it to let go). Raises LockHeld, or OSError if `path` cannot be
    opened."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise LockHeld(path, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
