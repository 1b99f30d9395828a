"""The few Linux process-control calls the supervisor needs, via prctl(2)."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Iterator

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


def die_with_parent(expected_parent: int, signum: int = signal.SIGKILL) -> None:
    """Send us `signum` when our parent dies (checked once, as the parent may already be
    gone: then we exit at once)."""
    _prctl(_PR_SET_PDEATHSIG, signum)
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


def reap(pids: list[int]) -> Iterator[tuple[int, int]]:
    """Reap those of `pids` (children of ours) that have exited: (pid, wait status) each.
    Only those: a child this process started for some other purpose (a `git` the
    daemon runs, say) is its owner's to wait for, and stealing its status would make
    that owner read a failure as a success."""
    for pid in pids:
        try:
            reaped, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if reaped:
            yield reaped, status


def session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except ProcessLookupError:
        return None


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


# An environment marker, inherited by every process of a daemon that keeps the
# environment it is given: the last resort for what nothing else can find — processes
# of a daemon whose zygote was killed together with it (see supervisor.zygote).
INSTANCE_ENV = "GENVISOR_INSTANCE"  # the daemon's state dir


def children(pid: int) -> list[int]:
    """The children of `pid` now (re-parented orphans included)."""
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(p) for p in f.read().split())
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def environ_value(pid: int, name: str) -> str | None:
    """`name` in the environment `pid` was exec'd with; None if absent or unreadable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            block = f.read()
    except OSError:
        return None
    prefix = name.encode() + b"="
    for item in block.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix):].decode(errors="replace")
    return None


def kill_marked(name: str, value: str) -> list[int]:
    """SIGKILL every process (but this one) whose environment has `name=value`."""
    killed = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and environ_value(int(entry), name) == value:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except ProcessLookupError:
                pass
    return killed


def kill_children(pid: int, keep: frozenset[int] = frozenset()) -> list[int]:
    """SIGKILL every child of `pid` but those in `keep`; returns the pids signalled."""
    killed = []
    for child in children(pid):
        if child in keep:
            continue
        try:
            os.kill(child, signal.SIGKILL)
            killed.append(child)
        except ProcessLookupError:
            pass
    return killed
