"""Runs: one worker process per run, one outcome per run, nothing left behind.

A run is a task in the supervisor's nursery wrapped in a cancel scope. Its outcome
settles exactly once — the first of: the worker's `Finished`, the worker dying
(`Crashed`), the deadline (`DeadlineExceeded`), `cancel()` (`Canceled`). Settling is
what the caller waits for; tearing the process down happens after, shielded:

    Stop frame ─(cancel grace)─▶ SIGTERM group ─(term grace)─▶ SIGKILL group
    → the worker reaped → SIGKILL whatever is left in its group → verify none remains

and the result of that check is recorded on the handle (`cleanup`).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any, Literal

import msgspec
import psutil
import trio

from genvisor.ipc.channel import FrameTooLarge
from genvisor.ipc.supervision import Finished, Progress, Start, Stop
from genvisor.logevent import event
from genvisor.supervisor.pool import Worker, WorkerPool, WorkersUnavailable, wait_for_exit
from genvisor.types import NodeStatus

log = logging.getLogger("genvisor.supervisor")


class Completed(msgspec.Struct, frozen=True, tag=True):
    outcome: msgspec.Raw


class Crashed(msgspec.Struct, frozen=True, tag=True):
    details: dict[str, Any]


class DeadlineExceeded(msgspec.Struct, frozen=True, tag=True):
    pass


class Canceled(msgspec.Struct, frozen=True, tag=True):
    reason: str


class Unavailable(msgspec.Struct, frozen=True, tag=True):
    message: str
    category: Literal["unknown", "transport"] = "unknown"  # transport: the cluster the runs go to cannot be reached


class Broken(msgspec.Struct, frozen=True, tag=True):
    """The worker sent what the run protocol does not allow (a frame that does not
    decode, or one over the channel's size limit): it is not trusted further."""

    message: str


RunOutcome = Completed | Crashed | DeadlineExceeded | Canceled | Unavailable | Broken


class CleanupReport(msgspec.Struct, frozen=True):
    """What was verified once a run's processes were gone."""

    pid: int
    ended_by: str  # "exit" | "stop" | "sigterm" | "sigkill"
    reaped_after_ms: float  # from the decision to end the run to the worker reaped
    leftovers_killed: list[int]
    verified: bool
    node: str | None = None  # the cluster node it ran on (None: this machine)


class ExecutorHealth(msgspec.Struct, frozen=True):
    spare_workers: int
    zygote_restarts: int
    nodes: list[NodeStatus] = []  # on a cluster: each node's share
    cluster: str | None = None  # on a cluster: "connecting" | "up" | "down"
    nodes_lost: int = 0


class RunHandle:
    def __init__(self, run_id: int) -> None:
        self.run_id = run_id
        self.pid: int | None = None
        self.outcome: RunOutcome | None = None
        self.cleanup: CleanupReport | None = None
        self.settled = trio.Event()
        self.cleaned_up = trio.Event()
        self._scope = trio.CancelScope()
        self._end_requested_at: float | None = None

    def cancel(self, reason: str) -> bool:
        """Begin ending the run. False if it had already settled (then nothing changes
        but the worker's teardown, which happens anyway)."""
        won = self._settle(Canceled(reason))
        self._scope.cancel()
        return won

    async def wait(self) -> RunOutcome:
        await self.settled.wait()
        assert self.outcome is not None
        return self.outcome

    def _settle(self, outcome: RunOutcome) -> bool:
        if self.outcome is not None:
            return False
        self.outcome = outcome
        self._end_requested_at = time.perf_counter()
        self.settled.set()
        return True


class Supervisor:
    """Starts runs in fresh workers and sees each to a verified end."""

    def __init__(self, pool: WorkerPool, *, cancel_grace_s: float, term_grace_s: float) -> None:
        self.pool = pool
        self._cancel_grace_s = cancel_grace_s
        self._term_grace_s = term_grace_s
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        self.active: dict[int, RunHandle] = {}
        self.cleanup_failures = 0

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.pool.run)
            async with trio.open_nursery() as runs:
                self._nursery = runs
                task_status.started()
                try:
                    await trio.sleep_forever()
                finally:
                    # Runs tear down shielded; cancelling them here only hurries them.
                    for handle in list(self.active.values()):
                        handle.cancel("daemon_shutdown")
            nursery.cancel_scope.cancel()

    def health(self) -> ExecutorHealth:
        return ExecutorHealth(spare_workers=self.pool.spare_count, zygote_restarts=self.pool.zygote_restarts)

    def start_run(self, spec: bytes, *, on_progress: Callable[[msgspec.Raw], None], deadline: float | None,
                  placement: str | None = None) -> RunHandle:
        assert self._nursery is not None, "Supervisor.run() is not running"
        handle = RunHandle(next(self._ids))
        self.active[handle.run_id] = handle
        self._nursery.start_soon(self._run, handle, spec, on_progress, deadline)
        return handle

    async def _run(self, handle: RunHandle, spec: bytes, on_progress, deadline: float | None) -> None:
        worker: Worker | None = None
        try:
            with handle._scope:
                try:
                    worker = await self.pool.acquire()
                except WorkersUnavailable as exc:
                    handle._settle(Unavailable(str(exc)))
                    return
                handle.pid = worker.pid
                with trio.move_on_at(deadline if deadline is not None else float("inf")) as deadline_scope:
                    await self._converse(handle, worker, spec, on_progress)
                if deadline_scope.cancelled_caught:
                    handle._settle(DeadlineExceeded())
        except Exception as exc:  # noqa: BLE001 — a run's failure is never the daemon's
            log.exception("run %d: supervision failed", handle.run_id)
            handle._settle(Broken(f"supervision failed: {exc!r}"))
        finally:
            with trio.CancelScope(shield=True):
                if worker is not None:
                    await self._end(handle, worker)
                self.active.pop(handle.run_id, None)
                handle.cleaned_up.set()

    async def _converse(self, handle: RunHandle, worker: Worker, spec: bytes, on_progress) -> None:
        try:
            await worker.channel.send(Start(spec=msgspec.Raw(spec)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it died between Ready and Start; the channel's end says so below
        while True:
            try:
                frame = await worker.channel.receive()
            except (FrameTooLarge, msgspec.DecodeError, UnicodeDecodeError) as exc:
                handle._settle(Broken(str(exc)))
                return
            if frame is None:
                await worker.exited.wait()  # the status is on its way from a reaper
                handle._settle(Crashed(worker.exit_details()))
                return
            if isinstance(frame, Progress):
                on_progress(frame.event)
            elif isinstance(frame, Finished):
                handle._settle(Completed(frame.outcome))
                return

    async def _end(self, handle: RunHandle, worker: Worker) -> None:
        started = handle._end_requested_at or time.perf_counter()
        ended_by = await self._stop(worker, handle.outcome)
        reaped_ms = (time.perf_counter() - started) * 1000
        await worker.channel.aclose()
        leftovers = await _sweep_group(worker.pid)
        handle.cleanup = CleanupReport(
            pid=worker.pid,
            ended_by=ended_by,
            reaped_after_ms=reaped_ms,
            leftovers_killed=leftovers.killed,
            verified=leftovers.verified,
        )
        if not leftovers.verified:
            self.cleanup_failures += 1
            event(log, "cleanup.failed", logging.ERROR, pid=worker.pid, survivors=leftovers.survivors)

    async def _stop(self, worker: Worker, outcome: RunOutcome | None) -> str:
        """Escalate until the worker is reaped; returns what ended it."""
        if worker.exited.is_set():
            return "exit"
        if isinstance(outcome, Completed):
            if await _exits_within(worker, self._cancel_grace_s):
                return "exit"
        elif not isinstance(outcome, DeadlineExceeded):  # canceled: ask first
            reason = outcome.reason if isinstance(outcome, Canceled) else "ended"
            try:
                await worker.channel.send(Stop(reason=reason))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            if await _exits_within(worker, self._cancel_grace_s):
                return "stop"
        if not isinstance(outcome, DeadlineExceeded):  # a deadline means stuck: no more waiting
            worker.signal_group(signal.SIGTERM)
            if await _exits_within(worker, self._term_grace_s):
                return "sigterm"
        worker.signal_group(signal.SIGKILL)
        await worker.exited.wait()
        return "sigkill"


async def _exits_within(worker: Worker, grace_s: float) -> bool:
    with trio.move_on_after(grace_s):
        await worker.exited.wait()
    return worker.exited.is_set()


class _Sweep(msgspec.Struct):
    killed: list[int]
    survivors: list[int]

    @property
    def verified(self) -> bool:
        return not self.survivors


SWEEP_DEADLINE_S = 2.0


async def _sweep_group(pgid: int) -> _Sweep:
    """Kill and wait out any process still in the run's process group or session.

    Runs after the leader is reaped; the pool already sent the group a SIGKILL, so
    this normally finds nothing. Zombies count as gone: their reaper (the zygote,
    a subreaper) collects them and they hold nothing but a pid.
    """
    killed: list[int] = []
    with trio.move_on_after(SWEEP_DEADLINE_S):
        while True:
            members = await _members_of(pgid)
            if not members:
                return _Sweep(killed=killed, survivors=[])
            for pid in members:
                if pid not in killed:
                    killed.append(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            await _wait_gone(members)
    return _Sweep(killed=killed, survivors=_living_members(pgid))


# A walk of /proc costs ≈1.5 µs a process. Where the machine runs few processes it is
# done on the loop; a thread hop (≈0.3 ms of CPU, GIL hand-offs) would cost more than
# the walk. Beyond this many, it goes to a thread, so the loop never stalls ≈1 ms.
INLINE_WALK_MAX_PIDS = 400
_pids_seen = 0


async def _members_of(pgid: int) -> list[int]:
    if _pids_seen <= INLINE_WALK_MAX_PIDS:
        await trio.lowlevel.checkpoint()
        return _living_members(pgid)
    return await trio.to_thread.run_sync(_living_members, pgid)


def _living_members(pgid: int) -> list[int]:
    global _pids_seen
    found = []
    pids = psutil.pids()
    _pids_seen = len(pids)
    for pid in pids:
        try:
            if os.getpgid(pid) != pgid and os.getsid(pid) != pgid:
                continue
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                found.append(pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


async def _wait_gone(pids: list[int]) -> None:
    for pid in pids:
        await wait_for_exit(pid)
