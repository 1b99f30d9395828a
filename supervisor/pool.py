"""Worker processes, daemon side: the zygote, fresh spares, and reaping.

Every generation gets a fresh process forked from the zygote. Forking a 30 MB
interpreter costs ≈2 ms before the child runs (copy-on-write faults), so the pool
keeps a few *spare* workers already forked and waiting for their one run: handing
one a run costs a frame on a socket. A spare is never reused after its run.

Reaping: the zygote reaps its children (workers, and their orphans, since it is a
subreaper) and reports each exit. The daemon is itself a subreaper and reaps its own
children on SIGCHLD: the zygote, and whatever the zygote left behind if it died.
Both paths end in `_child_exited`, so a worker's exit is seen exactly once.
"""

from __future__ import annotations

import array
import collections
import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec
import trio

from genvisor.ipc.channel import FramedChannel, FrameTooLarge
from genvisor.ipc.supervision import (
    Exited,
    FromWorker,
    FromZygote,
    Ready,
    Spawn,
    Spawned,
    SpawnFailed,
    ZygoteHello,
)
from genvisor.logevent import event
from genvisor.supervisor import linux
from genvisor.supervisor.worker import RunTarget, target_name

log = logging.getLogger("genvisor.supervisor")

_encoder = msgspec.msgpack.Encoder()
_zygote_decoder = msgspec.msgpack.Decoder(FromZygote)

ZYGOTE_START_TIMEOUT_S = 30.0  # a cold interpreter importing trio on a loaded box
WORKER_READY_TIMEOUT_S = 10.0
RESTART_BACKOFF_S = (0.05, 0.2, 1.0, 5.0)
# Spares forked at once: the zygote forks one at a time, but each child's start-up
# (page faults, warm-up) runs on its own core, so two keep up with a busy daemon.
CONCURRENT_SPAWNS = 2
# Consecutive failed spawns before a waiting run is told no worker can be had. A dying
# zygote takes the spawns in flight with it (up to CONCURRENT_SPAWNS); its successor
# should get the next one through.
ACQUIRE_GIVES_UP_AFTER = CONCURRENT_SPAWNS + 1


class WorkersUnavailable(Exception):
    """No worker could be started (the zygote is down and did not come back in time)."""


class Worker:
    """One worker process: its own process group (pgid == pid) and run channel."""

    channel: FramedChannel[FromWorker]  # set by the pool once the zygote has forked it

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.spawned_at = time.perf_counter()
        self.exited = trio.Event()
        self.wait_status: int | None = None

    def signal_group(self, signum: int) -> None:
        """Signal the worker's whole process group. Only while its leader is unreaped
        or just reaped: the group id cannot be reused while any member lives."""
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass

    def exit_details(self) -> dict[str, Any]:
        details: dict[str, Any] = {"pid": self.pid}
        if self.wait_status is not None:
            details.update(linux.describe_wait_status(self.wait_status))
        return details


class _Waiter:
    def __init__(self) -> None:
        self.woken = trio.Event()
        self.worker: Worker | None = None


class _Zygote:
    def __init__(self, pid: int, control: trio.socket.SocketType) -> None:
        self.pid = pid
        self.control = control
        # Spawns are requested concurrently; Trio lets one task at a time wait to send
        # on a socket, and with the zygote busy forking its buffer does fill (1 000 runs).
        self.send_lock = trio.Lock()
        self.hello = trio.Event()
        self.gone = trio.Event()
        self.started_at = time.monotonic()


class WorkerPool:
    def __init__(self, *, target: type[RunTarget], spares: int, preload: list[str] = [], instance: str | None = None) -> None:  # noqa: B006
        self._target = target_name(target)
        # Marks every process of this daemon (zygote, workers, what runs exec), so a
        # successor can find what a killed daemon left running.
        self._instance = instance
        self._preload = list(preload)
        self._spares_wanted = spares
        self._spares: list[Worker] = []
        self._spawning = 0
        self._spawn_failures = 0
        self._refill = trio.Event()
        # Acquirers waiting for a worker, in arrival order; spawns are made for them too.
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._last_spawn_error: WorkersUnavailable | None = None
        self._workers: dict[int, Worker] = {}
        self._pending: dict[int, tuple[trio.Event, list[Any]]] = {}
        self._tokens = itertools.count(1)
        self._zygote: _Zygote | None = None
        self._zygote_up = trio.Event()
        self._closing = False
        self.zygote_restarts = 0
        self.orphans_reaped = 0
        self.workers_spawned = 0
        self.on_spawn: Callable[[float], None] = lambda seconds: None  # spawn → Ready, for metrics

    # ---- lifecycle ---------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run the pool until cancelled; `started` once the first zygote is up."""
        linux.become_subreaper()
        if self._instance is not None:
            stale = await trio.to_thread.run_sync(linux.kill_marked, linux.INSTANCE_ENV, self._instance)
            if stale:
                event(log, "strays.killed", logging.WARNING, source="previous_daemon", pids=stale)
        async with trio.open_nursery() as nursery:
            await nursery.start(self._reap_children)
            await nursery.start(self._supervise_zygote)
            nursery.start_soon(self._keep_spares)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                with trio.CancelScope(shield=True):
                    await self._shutdown()
                nursery.cancel_scope.cancel()

    async def _shutdown(self) -> None:
        # Runs inside the pool's cancelled nursery: the reaper and zygote reader are
        # gone, so wait on pidfds and reap here.
        self._closing = True
        for worker in list(self._workers.values()):
            worker.signal_group(signal.SIGKILL)
            _kill(worker.pid)  # a fresh child may not have its own group yet
        zygote = self._zygote
        if zygote is not None:
            zygote.control.close()  # the zygote exits when its control channel ends
            with trio.move_on_after(5):
                await wait_for_exit(zygote.pid)
            _kill(zygote.pid)
            await wait_for_exit(zygote.pid)
        # Whatever the zygote had not reaped is ours now (we are a subreaper).
        self._reap_own_children()
        for pid in list(self._workers):
            await wait_for_exit(pid)
            self._reap_own_children()

    # ---- handing out workers ---------------------------------------------------------

    async def acquire(self) -> Worker:
        """A fresh worker, ready for its one run: a spare, or the next one spawned.

        Spawns happen in the pool's own tasks, never in the caller's: a caller
        cancelled while it waits leaves a finished spawn behind as a spare instead of
        a half-made worker and a leaked channel."""
        if self._spares and not self._waiters:
            worker = self._spares.pop()
            self._refill.set()
            return worker
        # First come, first served: a new spare goes straight to the longest waiter.
        # (Waking every waiter to race for it let newcomers win over and over: under
        # 32 clients some runs waited 4 s for a worker, and 1 000 waiters cost 10⁶ wake-ups.)
        waiter = _Waiter()
        self._waiters.append(waiter)
        self._refill.set()
        try:
            while waiter.worker is None:
                await waiter.woken.wait()
                if waiter.worker is None:  # a spawn failed
                    waiter.woken = trio.Event()
                    if self._spawn_failures >= ACQUIRE_GIVES_UP_AFTER:
                        assert self._last_spawn_error is not None
                        raise self._last_spawn_error
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            if waiter.worker is not None:  # handed one, but cancelled before taking it
                self._add_spare(waiter.worker)
            raise
        self._refill.set()
        return waiter.worker

    @property
    def spare_count(self) -> int:
        return len(self._spares)

    async def _keep_spares(self) -> None:
        async with trio.open_nursery() as spawning:
            while True:
                self._refill = trio.Event()
                while (
                    not self._closing
                    and self._spawning < CONCURRENT_SPAWNS
                    and len(self._spares) + self._spawning < self._spares_wanted + len(self._waiters)
                ):
                    self._spawning += 1
                    spawning.start_soon(self._spawn_spare)
                await self._refill.wait()

    async def _spawn_spare(self) -> None:
        try:
            self._add_spare(await self._spawn())
            self._spawn_failures = 0
        except WorkersUnavailable as exc:
            self._spawn_failures += 1
            self._last_spawn_error = exc
            event(log, "worker.spawn_failed", logging.WARNING, error=str(exc), consecutive=self._spawn_failures)
            self._wake_acquirers()
            await trio.sleep(RESTART_BACKOFF_S[min(self._spawn_failures, len(RESTART_BACKOFF_S)) - 1])
        finally:
            self._spawning -= 1
            self._refill.set()

    def _add_spare(self, worker: Worker) -> None:
        if self._waiters:
            waiter = self._waiters.popleft()
            waiter.worker = worker
            waiter.woken.set()
        else:
            self._spares.append(worker)

    def _wake_acquirers(self) -> None:
        """After a failed spawn: waiters check whether to give up."""
        for waiter in self._waiters:
            waiter.woken.set()

    async def _spawn(self) -> Worker:
        zygote = await self._wait_for_zygote()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        token = next(self._tokens)
        done = trio.Event()
        answer: list[Any] = []
        self._pending[token] = (done, answer)
        try:
            return await self._start_worker(zygote, token, done, answer, ours, theirs)
        except BaseException:
            # Failed, or cancelled (the pool closing): leave no socket and no worker
            # behind. One the zygote has not reported yet is killed when it is, as its
            # token is no longer pending; one it has is ours to kill while registered
            # (unreaped, so its pid is still its own).
            self._pending.pop(token, None)
            ours.close()
            if answer and isinstance(answer[0], Spawned) and answer[0].pid in self._workers:
                _kill(answer[0].pid)
            raise

    async def _start_worker(
        self, zygote: _Zygote, token: int, done: trio.Event, answer: list[Any], ours: socket.socket, theirs: socket.socket
    ) -> Worker:
        started = time.perf_counter()
        try:
            async with zygote.send_lock:
                await zygote.control.sendmsg(
                    [_encoder.encode(Spawn(token=token))],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))],
                )
        except OSError as exc:
            raise WorkersUnavailable(f"zygote unreachable: {exc}") from None
        finally:
            theirs.close()
        with trio.move_on_after(WORKER_READY_TIMEOUT_S):
            await done.wait()
        self._pending.pop(token, None)
        if not answer or isinstance(answer[0], SpawnFailed):
            raise WorkersUnavailable(answer[0].error if answer else "zygote did not answer a spawn")
        pid = answer[0].pid
        # _on_zygote_frame registered the pid, so an exit before now is not lost.
        worker = self._workers.get(pid)
        if worker is None:
            raise WorkersUnavailable(f"worker {pid} exited before it was ready")
        worker.channel = FramedChannel(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), FromWorker)
        worker.spawned_at = started
        ready = None
        with trio.move_on_after(WORKER_READY_TIMEOUT_S):
            try:
                ready = await worker.channel.receive()
            except (FrameTooLarge, msgspec.DecodeError, UnicodeDecodeError):
                pass  # not a Ready: refused below like a worker that died
        if not isinstance(ready, Ready):
            worker.signal_group(signal.SIGKILL)
            raise WorkersUnavailable(f"worker {pid} died before it was ready: {worker.exit_details()}")
        self.workers_spawned += 1
        self.on_spawn(time.perf_counter() - started)
        return worker

    # ---- the zygote --------------------------------------------------------------------

    async def _wait_for_zygote(self) -> _Zygote:
        with trio.move_on_after(ZYGOTE_START_TIMEOUT_S):
            while True:
                zygote = self._zygote
                if zygote is not None and zygote.hello.is_set() and not zygote.gone.is_set():
                    return zygote
                if self._closing:
                    break
                await self._zygote_up.wait()
        raise WorkersUnavailable("the zygote is not running")

    async def _supervise_zygote(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        failures = 0
        first = True
        while not self._closing:
            zygote = self._start_zygote()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_zygote, zygote)
                with trio.move_on_after(ZYGOTE_START_TIMEOUT_S):
                    await zygote.hello.wait()
                if zygote.hello.is_set():
                    self._zygote_up.set()
                    if first:
                        task_status.started()
                        first = False
                else:
                    event(log, "zygote.start_timeout", logging.ERROR, pid=zygote.pid, timeout_s=ZYGOTE_START_TIMEOUT_S)
                    _kill(zygote.pid)  # it may have died meanwhile
                await zygote.gone.wait()
                nursery.cancel_scope.cancel()
            self._zygote_up = trio.Event()
            zygote.control.close()
            if self._closing:
                return
            lived = time.monotonic() - zygote.started_at
            failures = 0 if lived > 30 else failures + 1
            self.zygote_restarts += 1
            delay = RESTART_BACKOFF_S[min(failures, len(RESTART_BACKOFF_S) - 1)]
            event(log, "zygote.restarting", logging.WARNING, pid=zygote.pid, lived_s=round(lived, 1), restart_in_s=delay,
                  restarts=self.zygote_restarts)
            await trio.sleep(delay)

    def _start_zygote(self) -> _Zygote:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        os.set_inheritable(theirs.fileno(), True)
        argv = [sys.executable, "-m", "genvisor.supervisor.zygote", str(theirs.fileno()), str(os.getpid()), self._target, *self._preload]
        # posix_spawn (vfork) from the main thread: PDEATHSIG fires when the *thread*
        # that forked exits, so a helper thread must not start the zygote.
        env = dict(os.environ)
        if self._instance is not None:
            env[linux.INSTANCE_ENV] = self._instance
        pid = os.posix_spawn(
            sys.executable,
            argv,
            env,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)],
        )
        theirs.close()
        event(log, "zygote.started", pid=pid)
        zygote = _Zygote(pid, trio.socket.from_stdlib_socket(ours))
        self._zygote = zygote
        return zygote

    async def _read_zygote(self, zygote: _Zygote) -> None:
        while True:
            try:
                data = await zygote.control.recv(65536)
            except OSError:
                data = b""
            if not data:
                return  # its exit is seen by _reap_children
            try:
                frame = _zygote_decoder.decode(data)
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                # Not the zygote we started any more: replace it (its exit is seen as usual).
                event(log, "zygote.protocol_error", logging.ERROR, pid=zygote.pid, error=str(exc))
                _kill(zygote.pid)
                return
            self._on_zygote_frame(zygote, frame)

    def _on_zygote_frame(self, zygote: _Zygote, frame: FromZygote) -> None:
        if isinstance(frame, ZygoteHello):
            zygote.hello.set()
        elif isinstance(frame, (Spawned, SpawnFailed)):
            pending = self._pending.get(frame.token)
            if pending is None:
                if isinstance(frame, Spawned):  # its spawner gave up waiting: do not leak it
                    # It may be gone already: its channel's end closed, and it exits
                    # when it sees that (the zygote reaps first and reports after).
                    _kill(frame.pid)
                return
            if isinstance(frame, Spawned):
                # Register before anyone awaits: the worker may exit at once.
                self._workers[frame.pid] = Worker(frame.pid)
            done, answer = pending
            answer.append(frame)
            done.set()
        elif isinstance(frame, Exited):
            self._child_exited(frame.pid, frame.status)

    # ---- reaping -----------------------------------------------------------------------

    async def _reap_children(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGCHLD) as signals:
            task_status.started()
            self._reap_own_children()
            async for _ in signals:
                self._reap_own_children()

    def _children_of_the_pool(self) -> list[int]:
        """The children of this process that the pool answers for: the zygote, and what
        came to us (a subreaper) from a dead zygote's tree — its processes are all in
        sessions of their own, as every worker starts one. A child this process started
        itself (the daemon runs `git` to restore workspaces) shares its session: not ours."""
        session = os.getsid(0)
        zygote = self._zygote
        return [pid for pid in linux.children(os.getpid())
                if (zygote is not None and pid == zygote.pid) or linux.session_of(pid) not in (session, None)]

    def _reap_own_children(self) -> None:
        for pid, status in linux.reap(self._children_of_the_pool()):
            self._child_exited(pid, status)
        self._kill_strays()

    def _kill_strays(self) -> None:
        """Kill what a dead zygote's tree left to us. A killed stray's children come to
        us in turn, and its exit brings a SIGCHLD and another pass."""
        zygote = self._zygote
        strays = [pid for pid in self._children_of_the_pool() if zygote is None or pid != zygote.pid or zygote.gone.is_set()]
        killed = []
        for pid in strays:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        if killed:
            event(log, "strays.killed", logging.WARNING, source="dead_zygote", pids=killed)

    def _child_exited(self, pid: int, status: int) -> None:
        zygote = self._zygote
        if zygote is not None and pid == zygote.pid:
            event(log, "zygote.exited", logging.INFO if self._closing else logging.ERROR, pid=pid, **linux.describe_wait_status(status))
            zygote.gone.set()
            # Its spares die with it (PDEATHSIG), but may not have yet: off the shelf
            # now, so no run is handed a worker that is about to die.
            for spare in self._spares:
                spare.signal_group(signal.SIGKILL)
                spare.channel.close()
            self._spares.clear()
            self._refill.set()
            self._kill_strays()  # its orphans are ours now (the kernel re-parented them first)
            return
        worker = self._workers.pop(pid, None)
        if worker is None:
            self.orphans_reaped += 1
            return
        worker.wait_status = status
        # Take down whatever the worker left in its group, while the group id is still
        # reserved by those members (it cannot be reused while any of them lives).
        worker.signal_group(signal.SIGKILL)
        worker.exited.set()
        if worker in self._spares:
            self._spares.remove(worker)
            worker.channel.close()  # no run will: it never had one
            self._refill.set()



def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def wait_for_exit(pid: int) -> None:
    """Return once `pid` has exited (a zombie counts), waiting on its pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)
