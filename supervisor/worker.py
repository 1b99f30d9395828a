"""The worker side of a run: what a freshly forked child of the zygote does.

A worker runs exactly one run, then exits. It lives in its own session and process
group (so the daemon can signal the whole group, tools included), is the subreaper of
what its run starts, and dies with the zygote (PDEATHSIG). It announces itself (`Ready`), waits for `Start`, runs the target
under a cancel scope that a `Stop` frame cancels, sends `Finished`, and exits with
os._exit — a run has nothing worth a slow interpreter shutdown.

The target is a `RunTarget`: `await target.run(spec, emit, host)` runs one spec,
`await emit(event)` forwarding a progress event, and `host` (a `WorkerHost`) is what
the run may ask of this process; it knows nothing else of processes. A spare awaits
`target.warm(host)` before announcing itself: the first pass through the code copies
the pages it touches (copy-on-write after fork), and that is better paid before a run
than during one. The zygote calls `target.prepare(host)` once before it forks any
worker: what it loads or builds (say, a registry read from package metadata, ≈8 ms of
CPU, or caches a first run fills) is then inherited by every worker instead of redone
in each. It must leave no thread running (fork would lose it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import msgspec
import trio

from genvisor.ipc.channel import FramedChannel
from genvisor.ipc.supervision import Finished, Progress, Ready, Start, Stop, ToWorker
from genvisor.supervisor import linux

Emit = Callable[[Any], Awaitable[None]]
T = TypeVar("T")


class RunTarget(Protocol):
    def prepare(self, host: Any) -> None: ...

    async def warm(self, host: Any) -> None: ...

    async def run(self, spec: msgspec.Raw, emit: Emit, host: Any) -> Any: ...


def target_name(target: type[RunTarget]) -> str:
    """How a zygote finds the target class it is given (it runs in a new interpreter)."""
    return f"{target.__module__}:{target.__qualname__}"


class WorkerHost:
    """A worker's process is its run's own (see genvisor.host)."""

    async def blocking(self, work: Callable[[], T]) -> T:
        return work()  # the loop serves only this run; a first thread would cost more (≈1.5 ms of CPU)

    async def crash(self, kind: str) -> None:
        if kind == "exit":
            os._exit(3)
        if kind == "signal":
            os.kill(os.getpid(), signal.SIGKILL)
        # "hang": stuck in native code, deaf to the graceful Stop and to SIGTERM.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while True:
            time.sleep(3600)

    def spawn(self, argv: list[str]) -> None:
        # In this worker's process group: the run's teardown kills it.
        subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

_encoder = msgspec.msgpack.Encoder()


def child_main(channel_fd: int, zygote_pid: int, target: RunTarget) -> int:
    os.setsid()
    linux.die_with_parent(zygote_pid)
    # Whatever the run starts and then orphans (a double fork, a daemonizing command)
    # is re-parented to this worker, whatever session or group it moved to and whatever
    # it did to its environment: so when the worker is gone, its run's strays pass to
    # the zygote, which knows them for strays and kills them.
    linux.become_subreaper()
    sock = socket.socket(fileno=channel_fd)
    return trio.run(_serve, sock, target)


async def _serve(sock: socket.socket, target: RunTarget) -> int:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    channel: FramedChannel[ToWorker] = FramedChannel(stream, ToWorker)
    host = WorkerHost()
    await target.warm(host)
    await channel.send(Ready(pid=os.getpid()))
    start = await channel.receive()
    if not isinstance(start, Start):
        return 0  # the daemon retired this spare (closed the channel) before using it

    async def emit(event: Any) -> None:
        await channel.send(Progress(event=msgspec.Raw(_encoder.encode(event))))

    async with trio.open_nursery() as nursery:
        run_scope = trio.CancelScope()

        async def listen_for_stop() -> None:
            # A Stop frame, or the daemon vanishing (end of stream), cancels the run.
            while True:
                frame = await channel.receive()
                if frame is None or isinstance(frame, Stop):
                    run_scope.cancel()
                    return

        nursery.start_soon(listen_for_stop)
        outcome = None
        with run_scope:
            outcome = await target.run(start.spec, emit, host)
        if not run_scope.cancelled_caught:
            await channel.send(Finished(outcome=msgspec.Raw(_encoder.encode(outcome))))
        # The last frame is in the kernel's buffer; the daemon reads it after we are
        # gone. Skip Trio's and the interpreter's teardown: nothing here needs it, and
        # the sooner the process is gone, the sooner the run's group is verified.
        os._exit(0)
