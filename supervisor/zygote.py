"""The zygote: a small fork server with the worker code already imported.

Started once by the daemon (and restarted if it dies), it forks one fresh worker per
request, so a worker does not pay the ≈130 ms import of trio and friends. It is plain
blocking Python — no Trio loop, no threads — because fork() of a process with threads
or a running event loop is unsafe.

It is a child subreaper: a worker's orphaned descendants come back to it, and it reaps
every child on SIGCHLD (waitpid, no polling), reporting each exit to the daemon. It
dies with the daemon (PDEATHSIG), and its workers die with it.

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

import msgspec

from genvisor.ipc.supervision import Exited, FromZygote, Spawn, Spawned, SpawnFailed, ToZygote, ZygoteHello
from genvisor.supervisor import linux, worker

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ToZygote)


def main(argv: list[str]) -> int:
    control_fd, daemon_pid, target, preload = int(argv[0]), int(argv[1]), argv[2], argv[3:]
    linux.die_with_parent(daemon_pid)
    linux.become_subreaper()
    run_target = _load_target(target)
    for module in preload:  # what workers would otherwise import on first use
        importlib.import_module(module)
    prepare = getattr(run_target, "prepare", None)
    if prepare is not None:
        prepare()  # loaded once here, shared by every worker (see supervisor.worker)
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
    return 0


def _serve(control: socket.socket, selector: selectors.BaseSelector, wake: tuple[int, int], run_target) -> None:
    wake_r = wake[0]
    while True:
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
            os.close(wake[0])
            os.close(wake[1])
            control.close()
            code = worker.child_main(channel_fd, zygote_pid, run_target)
        finally:
            os._exit(code)  # never return into the zygote's loop
    os.close(channel_fd)
    _workers.add(pid)
    _send(control, Spawned(token=request.token, pid=pid))


# The workers this zygote forked and has not reaped. Any other child is a process that
# left its run's group (setsid) and lost its parent, re-parented to us as subreaper.
_workers: set[int] = set()


def _reap_all(control: socket.socket) -> None:
    for pid, status in linux.reap_exited():
        _workers.discard(pid)
        _send(control, Exited(pid=pid, status=status))
    _kill_escapees()


def _kill_escapees() -> None:
    """Kill the re-parented strays whose run is over. Each exit here brings a SIGCHLD and
    another pass, so a stray's own children, re-parented in turn, go the same way."""
    for pid in linux.children(os.getpid()):
        if pid in _workers:
            continue
        owner = linux.environ_value(pid, linux.WORKER_ENV)
        if owner is not None and owner.isdigit() and int(owner) in _workers:
            continue  # its run is still going; it goes when its worker does
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _send(control: socket.socket, frame: FromZygote) -> None:
    control.sendall(_encoder.encode(frame))


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _load_target(target: str):
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
