"""The worker side of a run: what a freshly forked child of the zygote does.

A worker runs exactly one run, then exits. It lives in its own session and process
group (so the daemon can signal the whole group, tools included), is the subreaper of
what its run starts, and dies with the zygote (PDEATHSIG). It announces itself (`Ready`), waits for `Start`, runs the target
under a cancel scope that a `Stop` frame cancels, sends `Finished`, and exits with
os._exit — a run has nothing worth a slow interpreter shutdown.

The target is `async def target(spec: msgspec.Raw, emit) -> outcome`, where
`await emit(event)` forwards a progress event; it knows nothing of processes. If the
target has a `warm` attribute (`async def warm() -> None`), a spare awaits it before
announcing itself: the first pass through the code copies the pages it touches
(copy-on-write after fork), and that is better paid before a run than during one.
If it has a `prepare` attribute (a plain function), the zygote calls it once before
it forks any worker: what it loads or builds (say, a registry read from package
metadata, ≈8 ms of CPU, or caches a first run fills) is then inherited by every worker
instead of redone in each. It must leave no thread running (fork would lose it).
"""

from __future__ import annotations

import os
import socket
from typing import Any, Awaitable, Callable

import msgspec
import trio

from genvisor.ipc.channel import FramedChannel
from genvisor.ipc.supervision import Finished, Progress, Ready, Start, Stop, ToWorker
from genvisor.supervisor import linux

Emit = Callable[[Any], Awaitable[None]]
RunTarget = Callable[[msgspec.Raw, Emit], Awaitable[Any]]

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
    warm = getattr(target, "warm", None)
    if warm is not None:
        await warm()
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
            outcome = await target(start.spec, emit)
        if not run_scope.cancelled_caught:
            await channel.send(Finished(outcome=msgspec.Raw(_encoder.encode(outcome))))
        # The last frame is in the kernel's buffer; the daemon reads it after we are
        # gone. Skip Trio's and the interpreter's teardown: nothing here needs it, and
        # the sooner the process is gone, the sooner the run's group is verified.
        os._exit(0)
