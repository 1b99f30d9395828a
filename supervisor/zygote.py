"""The zygote: a small fork server with the worker code already imported.

Started once by the daemon (and restarted if it dies), it forks one fresh worker per
request, so a worker does not pay the ≈130 ms import of trio and friends. It is plain
blocking Python — no Trio loop, no threads — because fork() of a process with threads
or a running event loop is unsafe.

It is a child subreaper, as is every worker: what a run orphans goes to its worker,
and to the zygote once that worker is gone, whatever session, group or environment it
took on — so any child of the zygote that is not a worker is a stray of a finished
run, and is killed. It reaps every child on SIGCHLD (waitpid, no polling), reporting
each exit to the daemon. When the daemon goes (its control channel closes, or
PDEATHSIG says it died), it kills everything below it before it exits.

Run as: python -m genvisor.supervisor.zygote CONTROL_FD DAEMON_PID TARGET [PRELOAD ...]
(TARGET is `module:function`, the worker's run entry; see supervisor.worker.)
"""

from __future__ import annotations

import gc
import importlib
import os
import selectors
import signal
import socket
import sys
import time

import msgspec

from genvisor.ipc.supervision import Exited, FromZygote, Spawn, Spawned, SpawnFailed, ToZygote, ZygoteHello
from genvisor.supervisor import linux, worker

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ToZygote)


def main(argv: list[str]) -> int:
    control_fd, daemon_pid, target, preload = int(argv[0]), int(argv[1]), argv[2], argv[3:]
    # Told when the daemon dies, not killed with it: its runs' processes must go first.
    signal.signal(signal.SIGTERM, _daemon_gone)
    linux.die_with_parent(daemon_pid, signal.SIGTERM)
    linux.become_subreaper()
    run_target = _load_target(target)
    for module in preload:  # what workers would otherwise import on first use
        importlib.import_module(module)
    run_target.prepare(worker.WorkerHost())  # loaded once here, shared by every worker (see supervisor.worker)
    # Objects that exist now are shared copy-on-write with every worker; keep the
    # collector from touching (and so copying) them in each child.
    gc.freeze()
    control = socket.socket(fileno=control_fd)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when we stop
    _send(control, ZygoteHello(pid=os.getpid()))

    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ, "control")
    selector.register(wake_r, selectors.EVENT_READ, "sigchld")
    try:
        _serve(control, selector, (wake_r, wake_w), run_target)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the daemon is gone or closing: nobody is left to tell
    selector.unregister(control)  # at its end, or closed: readable for good
    _kill_everything_below(selector, wake_r)
    return 0


_daemon_died = False


def _daemon_gone(signum: int, frame: object) -> None:
    global _daemon_died
    _daemon_died = True  # the wakeup fd wakes the loop, which then stops


# Waiting for what was killed to be reaped, at most: a process stuck in the kernel
# (uninterruptible I/O) cannot be waited out forever by a zygote whose daemon is gone.
KILL_EVERYTHING_DEADLINE_S = 10.0


def _kill_everything_below(selector: selectors.BaseSelector, wake_r: int) -> None:
    """Kill every process below the zygote and reap it, however it got there: workers
    and their groups, and whatever was re-parented to us (a subreaper) as its parents
    died. Killing one re-parents its children to us in turn, so repeat until no child
    is left. This is how a run's processes end when the daemon goes — stopped, or
    killed with SIGKILL — whatever they did to their session, group or environment."""
    deadline = time.monotonic() + KILL_EVERYTHING_DEADLINE_S
    while time.monotonic() < deadline:
        for pid in _workers:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if not linux.kill_children(os.getpid()) and not linux.children(os.getpid()):
            return
        selector.select(timeout=0.05)  # a SIGCHLD wakes it sooner
        _drain(wake_r)
        for pid, _ in linux.reap_exited():
            _workers.discard(pid)


def _serve(control: socket.socket, selector: selectors.BaseSelector, wake: tuple[int, int], run_target) -> None:
    wake_r = wake[0]
    while not _daemon_died:
        for key, _ in selector.select():
            if key.data == "sigchld":
                _drain(wake_r)
                _reap_all(control)
                continue
            try:
                message, fds, _flags, _addr = socket.recv_fds(control, 65536, 4)
            except ConnectionResetError:
                message, fds = b"", []
            if not message:
                return  # the daemon closed the control channel: we are done
            request = _decoder.decode(message)
            _spawn(control, request, fds, wake, run_target)


def _spawn(control: socket.socket, request: Spawn, fds: list[int], wake: tuple[int, int], run_target) -> None:
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        _send(control, SpawnFailed(token=request.token, error=f"expected 1 channel fd, got {len(fds)}"))
        return
    (channel_fd,) = fds
    zygote_pid = os.getpid()
    try:
        pid = os.fork()
    except OSError as exc:
        os.close(channel_fd)
        _send(control, SpawnFailed(token=request.token, error=f"fork failed: {exc}"))
        return
    if pid == 0:
        code = 70
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.close(wake[0])
            os.close(wake[1])
            control.close()
            code = worker.child_main(channel_fd, zygote_pid, run_target)
        finally:
            os._exit(code)  # never return into the zygote's loop
    os.close(channel_fd)
    _workers.add(pid)
    _send(control, Spawned(token=request.token, pid=pid))


# The workers this zygote forked and has not reaped. Any other child is a stray: a
# process a run orphaned, re-parented to its worker (a subreaper) and, once that worker
# was gone, to us — so its run is over.
_workers: set[int] = set()


def _reap_all(control: socket.socket) -> None:
    for pid, status in linux.reap_exited():
        _workers.discard(pid)
        _send(control, Exited(pid=pid, status=status))
    # A worker's strays are ours the moment it has exited (the kernel re-parents them
    # before we are told); each of their exits brings another pass, so their own
    # children, re-parented in turn, go the same way.
    linux.kill_children(os.getpid(), keep=frozenset(_workers))


def _send(control: socket.socket, frame: FromZygote) -> None:
    control.sendall(_encoder.encode(frame))


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _load_target(target: str) -> worker.RunTarget:
    """An instance of the target class `target` names (see worker.target_name)."""
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
