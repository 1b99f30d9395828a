"""A node's agent: the node's runs, with the same machinery as a daemon on one machine.

On a Ray cluster the daemon stays the one control plane and only the runs move: each
node runs one agent, started by a Ray actor pinned to that node (supervisor.ray_bridge).
The agent is a plain Trio process — not the actor itself, whose process is Ray's, with
its threads and signal handlers — holding today's zygote, spares and `Supervisor`, so a
run on a node is a fresh process in its own group, killed, reaped and verified gone
there exactly as on one machine. It serves the daemon over one CURVE-secured ZeroMQ
connection (ipc.node), accepting only the daemon's key.

It ends when its actor's process does (Ray killed the actor, or its node), or when it
has heard nothing from its daemon for `DAEMON_SILENT_S` (the daemon was killed: the
actors are detached, so they outlive the daemon's driver and a restart of it); then its
runs are canceled and torn down, and its zygote — told by PDEATHSIG if the agent was
killed outright — kills whatever is left below it.

Run as: python -m genvisor.supervisor.node_agent SETTINGS_JSON; it prints one line of
JSON (its endpoint and public key) on stdout once it is serving.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable
from typing import Any

import msgspec
import trio
import zmq

from genvisor.ipc.node import (
    DAEMON_SILENT_S,
    HEARTBEAT_S,
    ORPHANED_EXIT,
    AgentHello,
    CallAnswered,
    CallOnNode,
    CancelOnNode,
    FromAgent,
    RunCleanedUp,
    RunOnNode,
    RunProgress,
    RunSettled,
    ToAgent,
)
from genvisor.ipc.node_link import AgentSocket
from genvisor.ipc.trio_zmq import TrioSocket
from genvisor.logevent import FIELDS_ATTRIBUTE, event
from genvisor.supervisor.pool import WorkerPool, wait_for_exit
from genvisor.supervisor.runs import RunHandle, Supervisor

log = logging.getLogger("genvisor.agent")

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(ToAgent)
_NIL = msgspec.Raw(_encoder.encode(None))


class AgentSettings(msgspec.Struct, frozen=True):
    node: str
    host: str  # the address to listen on (the node's)
    daemon_key: str  # the daemon's CURVE public key (z85): the one client let in
    target: str  # the workers' RunTarget, module:Class
    calls: str  # the workspace functions the daemon may call here, module:attribute (a dict)
    preload: list[str] = []
    spares: int = 1
    cancel_grace_s: float = 2.0
    term_grace_s: float = 1.0
    instance: str | None = None


def _load(name: str) -> Any:
    module, _, attribute = name.partition(":")
    return getattr(importlib.import_module(module), attribute)


class Agent:
    def __init__(self, settings: AgentSettings, sock: TrioSocket, supervisor: Supervisor, calls: dict[str, Callable[..., Any]]) -> None:
        self._settings = settings
        self._sock = sock
        self._supervisor = supervisor
        self._calls = calls
        self._runs: dict[int, RunHandle] = {}
        self._out_send, self._out_receive = trio.open_memory_channel[bytes](math.inf)
        self._heard_at = trio.current_time()
        self.orphaned = trio.Event()

    def _send(self, frame: FromAgent) -> None:
        self._out_send.send_nowait(_encoder.encode(frame))

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_frames)
            nursery.start_soon(self._heartbeat)
            nursery.start_soon(self._watch_daemon)
            while True:
                [data] = await self._sock.recv_multipart()
                self._heard_at = trio.current_time()
                try:
                    frame = _decoder.decode(data)
                except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                    log.error("a frame that does not decode: %s", exc)
                    continue
                if isinstance(frame, RunOnNode):
                    self._start(nursery, frame)
                elif isinstance(frame, CancelOnNode):
                    handle = self._runs.get(frame.run)
                    if handle is not None:
                        handle.cancel(frame.reason)
                elif isinstance(frame, CallOnNode):
                    nursery.start_soon(self._call, frame)

    async def _send_frames(self) -> None:
        async for data in self._out_receive:
            await self._sock.send_multipart([data])

    async def _heartbeat(self) -> None:
        while True:
            health = self._supervisor.health()
            self._send(AgentHello(node=self._settings.node, pid=os.getpid(), spare_workers=health.spare_workers,
                                  zygote_restarts=health.zygote_restarts))
            await trio.sleep(HEARTBEAT_S)

    async def _watch_daemon(self) -> None:
        while trio.current_time() - self._heard_at <= DAEMON_SILENT_S:
            await trio.sleep(HEARTBEAT_S)
        event(log, "agent.orphaned", logging.WARNING, silent_s=DAEMON_SILENT_S, runs=len(self._runs))
        self.orphaned.set()

    def _start(self, nursery: trio.Nursery, frame: RunOnNode) -> None:
        if frame.run in self._runs:
            return  # a duplicate: the first is the run
        deadline = trio.current_time() + frame.timeout_s if frame.timeout_s is not None else None
        run = frame.run
        handle = self._supervisor.start_run(
            bytes(frame.spec), on_progress=lambda raw: self._send(RunProgress(run=run, event=raw)), deadline=deadline
        )
        self._runs[run] = handle
        nursery.start_soon(self._report, run, handle)

    async def _report(self, run: int, handle: RunHandle) -> None:
        outcome = await handle.wait()
        self._send(RunSettled(run=run, outcome=msgspec.Raw(_encoder.encode(outcome))))
        await handle.cleaned_up.wait()
        self._send(RunCleanedUp(run=run, cleanup=msgspec.Raw(_encoder.encode(handle.cleanup))))
        del self._runs[run]

    async def _call(self, frame: CallOnNode) -> None:
        function = self._calls.get(frame.op)
        if function is None:
            self._send(CallAnswered(call=frame.call, result=_NIL, error=f"no workspace call {frame.op!r} on this node"))
            return
        try:
            args = msgspec.msgpack.decode(frame.args, type=list[Any])
            result = await trio.to_thread.run_sync(lambda: function(*args))
            answer = CallAnswered(call=frame.call, result=msgspec.Raw(_encoder.encode(result)))
        except Exception as exc:  # noqa: BLE001 — the caller reports it; the agent goes on
            log.exception("workspace call %s failed", frame.op)
            answer = CallAnswered(call=frame.call, result=_NIL, error=f"{type(exc).__name__}: {exc}")
        self._send(answer)


async def serve(settings: AgentSettings, parent: int) -> int:
    pool = WorkerPool(target=_load(settings.target), spares=settings.spares, preload=settings.preload, instance=settings.instance)
    supervisor = Supervisor(pool, cancel_grace_s=settings.cancel_grace_s, term_grace_s=settings.term_grace_s)
    ctx = zmq.Context()
    link = AgentSocket(ctx, settings.host, settings.daemon_key)
    try:
        async with TrioSocket.open(link.socket) as sock, trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            agent = Agent(settings, sock, supervisor, _load(settings.calls))
            nursery.start_soon(agent.serve)
            print(json.dumps({"endpoint": link.endpoint, "key": link.public.decode()}), flush=True)
            nursery.start_soon(_end_when_gone, parent, nursery.cancel_scope)  # the actor's process: so ends this node's share
            await agent.orphaned.wait()  # or the daemon gone
            nursery.cancel_scope.cancel()
    finally:
        link.close()
        ctx.term()
    return ORPHANED_EXIT if agent.orphaned.is_set() else 0


async def _end_when_gone(pid: int, scope: trio.CancelScope) -> None:
    await wait_for_exit(pid)
    scope.cancel()


class _EventFormat(logging.Formatter):
    """name key=value …: the agent's lines land in Ray's worker logs (logs/worker-*.err)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, FIELDS_ATTRIBUTE, {})
        line = f"genvisor-agent {record.levelname} {record.getMessage()} " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def main(argv: list[str]) -> int:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EventFormat())
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    settings = msgspec.json.decode(argv[0], type=AgentSettings)
    return trio.run(serve, settings, os.getppid())


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
