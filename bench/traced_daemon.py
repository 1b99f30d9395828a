"""A traced daemon: the real `genvisor serve`, with a timestamp taken at each hop of a
generation, to show where its time goes.

    python -m bench.traced_daemon TRACE_DIR serve --endpoint … --config …

Nothing is replaced: a few methods are wrapped to note `time.perf_counter()` (the
system-wide CLOCK_MONOTONIC on Linux, so client, daemon and worker stamps compare).
The daemon's stamps are written to TRACE_DIR/daemon.msgpack when it exits; each worker
appends its run's start and end to TRACE_DIR/workers.txt. A hook whose method has
gone (the daemon is being changed under us) is skipped and its hop reads n/a.

The workers run `TracedTurnTarget`, the daemon's own target with only its `run`
stamped: its `prepare` (in the zygote, before any fork) and `warm` (in each spare,
before it says Ready) are the real ones, inherited, so the worker traced is as warm
as the worker measured untraced.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec

from genvisor.modes.loop import TurnTarget

_TRACE_ENV = "GENVISOR_BENCH_TRACE"
_stamps: list[tuple[str, float]] = []


def _wrap(owner: Any, name: str, label: str, *, at: str = "exit") -> bool:
    original = getattr(owner, name, None)
    if original is None:
        return False
    note = _stamps.append
    clock = time.perf_counter

    if inspect.iscoroutinefunction(original):
        @functools.wraps(original)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            if at == "entry":
                note((label, clock()))
            result = await original(*args, **kwargs)
            if at == "exit":
                note((label, clock()))
            return result
    else:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if at == "entry":
                note((label, clock()))
            result = original(*args, **kwargs)
            if at == "exit" and result is not False:  # RunHandle._settle: False = already settled
                note((label, clock()))
            return result

    setattr(owner, name, wrapper)
    return True


def install() -> list[str]:
    """Wrap the hops of a generation; returns the labels that could not be hooked."""
    from genvisor.daemon import durable, generations, server
    from genvisor.ipc.trio_zmq import TrioSocket
    from genvisor.supervisor import pool, runs

    unhooked = []
    if server.WORKER_TARGET is TurnTarget:
        server.WORKER_TARGET = TracedTurnTarget
    else:  # a target this bench does not know: leave it, untraced, rather than run another
        unhooked.append("worker")
    hooks = [
        (TrioSocket, "recv_multipart", "recv", "exit"),  # a client frame is in
        (generations.Generations, "generate", "admitted", "exit"),  # journaled, spec built, run handed over
        (runs.Supervisor, "_converse", "acquired", "entry"),  # a spare in hand, Start about to go
        (runs.RunHandle, "_settle", "settled", "exit"),  # the worker's Finished is read
        (generations.Generations, "_finish", "committed", "exit"),  # outcome applied, its journal writes submitted
        (durable.DurableLog, "_commit", "durable", "exit"),  # a batch of journal writes is durable
        (TrioSocket, "try_send_multipart", "sent", "exit"),  # a frame handed to ZeroMQ (the outbox's only send; False: not sent)
        (pool.WorkerPool, "_spawn", "spawn_end", "exit"),  # a spare forked and Ready
        (pool.WorkerPool, "_spawn", "spawn_begin", "entry"),
    ]
    return unhooked + [label for owner, name, label, at in hooks if not _wrap(owner, name, label, at=at)]


class TracedTurnTarget(TurnTarget):
    """The daemon's worker target, its run stamped at its start and end. Only `run` is
    overridden: `prepare` and `warm` are TurnTarget's, so the zygote and the spares do
    what they do for the daemon untraced."""

    async def run(self, spec: msgspec.Raw, emit: Any, host: Any) -> Any:
        started = time.perf_counter()
        outcome = await super().run(spec, emit, host)
        ended = time.perf_counter()
        fd = os.open(os.environ[_TRACE_ENV] + "/workers.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, f"{started} {ended}\n".encode())  # one small O_APPEND write: atomic
        finally:
            os.close(fd)
        return outcome


def main(argv: list[str]) -> int:
    trace_dir = Path(argv[0])
    trace_dir.mkdir(parents=True, exist_ok=True)
    os.environ[_TRACE_ENV] = str(trace_dir)  # inherited by the zygote and its workers
    missing = install()
    from genvisor.__main__ import main as genvisor_main

    try:
        return genvisor_main(argv[1:])
    finally:
        (trace_dir / "daemon.msgpack").write_bytes(msgspec.msgpack.encode({"stamps": _stamps, "missing": missing}))


if __name__ == "__main__":
    # Run as the module the zygote will import: the workers' target must be found by
    # its name, bench.traced_daemon:TracedTurnTarget (not __main__'s copy of it).
    from bench.traced_daemon import main as traced_main

    sys.exit(traced_main(sys.argv[1:]))
