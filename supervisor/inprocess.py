"""The in-process executor: runs a target in a task of this process, not in a worker.

It honours the same contract as `Supervisor` (a `RunHandle`, exactly one outcome,
a deadline), so the embedded runtime and the parity tests can swap one for the other.
There is no process to isolate or reap: a target that wants to "exit" raises
`SystemExit(code)` (negative: "killed by that signal"), reported as `Crashed` with
the details a worker's exit would have had.
"""

from __future__ import annotations

import importlib
import itertools
import os
import signal
from typing import Any, Callable

import msgspec
import trio

from genvisor.supervisor.runs import Completed, Crashed, DeadlineExceeded, ExecutorHealth, RunHandle

_encoder = msgspec.msgpack.Encoder()


class InProcessExecutor:
    def __init__(self, target: str) -> None:
        module_name, _, attribute = target.partition(":")
        self._target = getattr(importlib.import_module(module_name), attribute)
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

    def start_run(self, spec: bytes, *, on_progress: Callable[[msgspec.Raw], None], deadline: float | None) -> RunHandle:
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
                    outcome = await self._target(msgspec.Raw(spec), emit, isolated=False)
                except SystemExit as exit_:
                    handle._settle(Crashed(_exit_details(exit_.code)))
                except Exception as exc:  # noqa: BLE001 — what would kill a worker must not kill this process
                    handle._settle(Crashed({"pid": os.getpid(), "exception": repr(exc)}))
                else:
                    handle._settle(Completed(msgspec.Raw(_encoder.encode(outcome))))
            if deadline_scope.cancelled_caught:
                handle._settle(DeadlineExceeded())
        finally:
            self.active.pop(handle.run_id, None)
            handle.cleaned_up.set()


def _exit_details(code: Any) -> dict[str, Any]:
    details: dict[str, Any] = {"pid": os.getpid()}
    if isinstance(code, int) and code < 0:
        details.update(signal=-code, signal_name=signal.Signals(-code).name)
    else:
        details["exit_code"] = code if isinstance(code, int) else 1
    return details
