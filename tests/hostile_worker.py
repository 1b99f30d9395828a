"""Run targets that break the worker protocol, and a driver that supervises them.

    python tests/hostile_worker.py TARGET   → prints the run's outcome type, exits 0

The driver runs a real WorkerPool and Supervisor in a process of its own (a pool makes
its process a subreaper and reaps all its children: not something to do inside
pytest). The targets reach the run channel the way only a broken or compromised worker
would: through the emit function's closure.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import msgspec
import trio

from genvisor.ipc.channel import MAX_CHANNEL_FRAME, FramedChannel, pack_frame


def _channel(emit: Any) -> FramedChannel:
    return next(c.cell_contents for c in emit.__closure__ if isinstance(c.cell_contents, FramedChannel))


class _Hostile:
    """A run target whose `run` breaks the protocol (`prepare` and `warm` do nothing)."""

    def prepare(self, host: Any) -> None:
        pass

    async def warm(self, host: Any) -> None:
        pass

    async def run(self, spec: msgspec.Raw, emit: Any, host: Any) -> None:
        await _channel(emit)._stream.send_all(self.frame())
        await trio.sleep_forever()

    def frame(self) -> bytes:
        raise NotImplementedError


class undecodable_frame(_Hostile):  # noqa: N801 — named as the test names the case
    def frame(self) -> bytes:
        return pack_frame(b"\xc1 is no msgpack")


class wrong_frame_type(_Hostile):  # noqa: N801
    def frame(self) -> bytes:
        return pack_frame(msgspec.msgpack.encode({"type": "Promoted", "to": "daemon"}))


class oversized_frame(_Hostile):  # noqa: N801
    def frame(self) -> bytes:
        return (MAX_CHANNEL_FRAME + 1).to_bytes(4, "big")


async def _drive(target: str) -> str:
    import hostile_worker  # by its module's name, not __main__'s: the zygote imports it so
    from genvisor.supervisor.pool import WorkerPool
    from genvisor.supervisor.runs import Supervisor

    supervisor = Supervisor(WorkerPool(target=getattr(hostile_worker, target), spares=0), cancel_grace_s=0.2, term_grace_s=0.2)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        handle = supervisor.start_run(b"\x80", on_progress=lambda raw: None, deadline=trio.current_time() + 20)
        outcome = await handle.wait()
        await handle.cleaned_up.wait()
        assert handle.cleanup is not None and handle.cleanup.verified, handle.cleanup
        nursery.cancel_scope.cancel()
    return f"{type(outcome).__name__}: {getattr(outcome, 'message', '')}"


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    os.environ["PYTHONPATH"] = os.path.dirname(os.path.abspath(__file__)) + os.pathsep + os.environ.get("PYTHONPATH", "")
    print(trio.run(_drive, sys.argv[1]))
