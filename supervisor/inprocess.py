"""The in-process executor: runs a target in a task of this process, not in a worker.

It honours the same contract as `Supervisor` (a `RunHandle`, exactly one outcome,
a deadline), so the embedded runtime and the parity tests can swap one for the other.
There is no process to isolate or reap. The run's host (`InProcessHost`) sends
blocking work to a thread, refuses to leave processes running, and stands a crash
in with `SystemExit(code)` (negative: "killed by that signal"), which is reported as
`Crashed` with the details a worker's exit would have had; a target that raises
anything else is reported as crashed too.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import trio

from genvisor.host import HostRefused
from genvisor.supervisor.runs import Completed, Crashed, DeadlineExceeded, ExecutorHealth, RunHandle
from genvisor.supervisor.worker import RunTarget

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()


class InProcessHost:
    """The daemon's own process hosts the run (see genvisor.host)."""

    async def blocking(self, work: Callable[[], T]) -> T:
        return await trio.to_thread.run_sync(work)  # the loop is everyone's

    async def crash(self, kind: str) -> None:
        if kind == "exit":
            raise SystemExit(3)
        if kind == "signal":
            raise SystemExit(-signal.SIGKILL)
        await trio.sleep_forever()  # "hang": never answers (a deadline or a cancel ends it)

    def spawn(self, argv: list[str]) -> None:
        raise HostRefused("a process left running needs an isolated worker (nothing here would reap it)")


class InProcessExecutor:
    def __init__(self, target: type[RunTarget]) -> None:
        self._target = target()
        self._host = InProcessHost()
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self.active: dict[int, RunHandle] = {}

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def health(self) -> ExecutorHealth:
        return ExecutorHealth(spare_workers=0, zygote_restarts=0)  # no processes here

    def start_run(self, spec: bytes, *, on_progress: Callable[[msgspec.Raw], None], deadline: float | None,
                  placement: str | None = None) -> RunHandle:
        assert self._nursery is not None, "InProcessExecutor.run() is not running"
        handle = RunHandle(next(self._ids))
        handle.pid = os.getpid()
        self.active[handle.run_id] = handle
        self._nursery.start_soon(self._run, handle, spec, on_progress, deadline)
        return handle

    async def _run(self, handle: RunHandle, spec: bytes, on_progress, deadline: float | None) -> None:
        async def emit(event: Any) -> None:
            on_progress(msgspec.Raw(_encoder.encode(event)))

        try:
            with handle._scope, trio.move_on_at(deadline if deadline is not None else float("inf")) as deadline_scope:
                try:
                    outcome = await self._target.run(msgspec.Raw(spec), emit, self._host)
                except Exception as exc:  # noqa: BLE001 — what would kill a worker must not kill this process
                    handle._settle(Crashed({"pid": os.getpid(), "exception": repr(exc)}))
                except BaseException as exc:
                    exit_ = _stood_in_exit(exc)
                    if exit_ is None:
                        raise  # a cancellation, or a real exit: not the run's
                    handle._settle(Crashed(_exit_details(exit_.code)))
                else:
                    handle._settle(Completed(msgspec.Raw(_encoder.encode(outcome))))
            if deadline_scope.cancelled_caught:
                handle._settle(DeadlineExceeded())
        finally:
            self.active.pop(handle.run_id, None)
            handle.cleaned_up.set()


def _stood_in_exit(exc: BaseException) -> SystemExit | None:
    """The host's stand-in for a crash (a SystemExit), raised alone or from inside a
    nursery (an exception group holding nothing else)."""
    if isinstance(exc, SystemExit):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        exits, rest = exc.split(SystemExit)
        if exits is not None and rest is None:
            return _stood_in_exit(exits.exceptions[0])
    return None


def _exit_details(code: Any) -> dict[str, Any]:
    details: dict[str, Any] = {"pid": os.getpid()}
    if isinstance(code, int) and code < 0:
        details.update(signal=-code, signal_name=signal.Signals(-code).name)
    else:
        details["exit_code"] = code if isinstance(code, int) else 1
    return details
