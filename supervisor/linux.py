"""The few Linux process-control calls the supervisor needs, via prctl(2)."""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Iterator

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def become_subreaper() -> None:
    """Orphaned descendants are re-parented to us, not to PID 1, so none escape."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(expected_parent: int) -> None:
    """SIGKILL us when our parent dies (checked once, as the parent may already be gone)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != expected_parent:
        os._exit(1)


def reap_exited() -> Iterator[tuple[int, int]]:
    """Reap every child that has exited, without blocking: (pid, wait status) each."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def describe_wait_status(status: int) -> dict[str, int | str]:
    """`{"exit_code": n}` or `{"signal": n, "signal_name": "SIGKILL"}`."""
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return {"signal": number, "signal_name": name}
    return {"exit_code": os.waitstatus_to_exitcode(status)}
