"""The Ray executor: runs go to a Ray cluster's nodes, behind the same contract as
`Supervisor` (a `RunHandle`, exactly one outcome, a verified cleanup record).

    daemon ── RayExecutor ──socketpair── bridge (Ray driver)  ─ Ray ─▶  NodeAgentActor, one per node
                   │                                                       │ starts
                   └──────────── ZeroMQ, CURVE (ipc.node) ────────────▶ node agent: zygote, spares, Supervisor

Ray places the agents and watches the nodes (supervisor.ray_bridge); each agent runs
its node's runs as a daemon runs them on one machine (supervisor.node_agent): a fresh
process per run in its own group, torn down and verified gone there. The daemon
talks to the agents directly, so a run's events come back as they happen, and a
cancel reaches the node in one hop.

Faults, each ending a run exactly once: a node lost (its actor died, its agent went
silent, or the cluster went away) ends each of its runs as `Crashed` with
`reason: node_lost`; with no cluster, a new run is `Unavailable` at once (category
`transport`); the bridge is started again, with back-off, until the cluster is back.

Workspaces: with `workspaces = "node"` a workspace's runs go to the node that ran its
first one (pinned, and the pin kept in the state dir), and the daemon's work on a
workspace (undoing a run, reading or reverting a change set) is done there too, by
the agent (`call`); with `"shared"` any node will do.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec
import trio
import zmq

from genvisor.ipc.channel import FramedChannel
from genvisor.ipc.node import (
    HEARTBEAT_S,
    AgentHello,
    CallAnswered,
    CallOnNode,
    CancelOnNode,
    ClusterDown,
    ClusterUp,
    DaemonPing,
    DropNode,
    FromAgent,
    FromBridge,
    NodeInfo,
    NodeJoined,
    NodeLost,
    RunCleanedUp,
    RunOnNode,
    RunProgress,
    RunSettled,
    ToAgent,
)
from genvisor.ipc.node_link import daemon_socket, new_keys
from genvisor.ipc.trio_zmq import TrioSocket
from genvisor.logevent import event
from genvisor.supervisor.pool import wait_for_exit
from genvisor.supervisor.ray_bridge import BridgeSettings
from genvisor.supervisor.runs import (
    Broken,
    CleanupReport,
    Crashed,
    DeadlineExceeded,
    ExecutorHealth,
    RunHandle,
    RunOutcome,
    Unavailable,
)
from genvisor.types import NodeStatus

log = logging.getLogger("genvisor.supervisor")

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
_agent_decoder = msgspec.msgpack.Decoder(FromAgent)
_outcome_decoder = msgspec.msgpack.Decoder(RunOutcome)
_cleanup_decoder = msgspec.msgpack.Decoder(CleanupReport | None)
_PING = _encoder.encode(DaemonPing())

# An agent not heard from for this long is lost (its heartbeat is every HEARTBEAT_S).
AGENT_SILENT_S = 5 * HEARTBEAT_S
# A run started while the first connection is still being made waits this long for it.
FIRST_CONNECT_WAIT_S = 120.0
BRIDGE_RESTART_S = (0.5, 1.0, 2.0, 5.0)
BRIDGE_STOP_S = 10.0  # for the bridge to disconnect from Ray (a Ray of its own: to stop it) before it is killed
# Beyond a run's deadline, how long its agent has to say how it ended before the
# daemon ends it itself (the agent enforces the deadline; this is for a mute one).
DEADLINE_BACKSTOP_S = 5.0
# A workspace call (git over a large tree) may take this long.
CALL_TIMEOUT_S = 300.0

WorkspacePolicy = Literal["node", "shared"]


class ClusterUnavailable(Exception):
    pass


class _RemoteRun:
    def __init__(self, handle: RunHandle, on_progress: Callable[[msgspec.Raw], None]) -> None:
        self.handle = handle
        self.on_progress = on_progress
        self.agent_settled = False
        self.cleaned = trio.Event()
        self.cleanup: CleanupReport | None = None


class _Node:
    def __init__(self, info: NodeInfo, sock: TrioSocket, heard_at: float) -> None:
        self.info = info
        self.sock = sock
        self.runs: dict[int, _RemoteRun] = {}
        self.calls: dict[int, tuple[trio.Event, list[CallAnswered]]] = {}
        self.heard_at = heard_at
        self.spare_workers = 0
        self.zygote_restarts = 0
        self.runs_started = 0
        self.scope = trio.CancelScope()

    async def send(self, frame: ToAgent) -> None:
        await self.sock.send_multipart([_encoder.encode(frame)])


class RayExecutor:
    def __init__(self, settings: BridgeSettings, *, workspaces: WorkspacePolicy = "node", pins: Path | None = None,
                 teardown_s: float = 10.0) -> None:
        self._settings = settings
        self._workspaces = workspaces
        self._pins_path = pins
        self._pins: dict[str, Pin] = {}  # workspace → the node that holds it; read in run()
        self._pins_written = trio.Lock()
        self._teardown_s = teardown_s  # for a cancel to be seen through on the node
        self._ids = itertools.count(1)
        self._calls = itertools.count(1)
        self._placed = itertools.count()
        self._nursery: trio.Nursery | None = None
        self._runs_nursery: trio.Nursery | None = None
        self._ctx: zmq.Context[zmq.Socket[bytes]] | None = None
        self._bridge: FramedChannel[FromBridge] | None = None
        self._keys = new_keys()
        self.active: dict[int, RunHandle] = {}
        self.nodes: dict[str, _Node] = {}
        self.state: Literal["connecting", "up", "down"] = "connecting"
        self.down_error = ""
        self._state_changed = trio.Event()
        self.nodes_lost = 0

    # ---- lifecycle -----------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._pins = await trio.to_thread.run_sync(_read_pins, self._pins_path)
        self._ctx = zmq.Context()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._keep_bridge)
                nursery.start_soon(self._watch_silence)
                async with trio.open_nursery() as runs:
                    self._runs_nursery = runs
                    task_status.started()
                    try:
                        await trio.sleep_forever()
                    finally:
                        for handle in list(self.active.values()):
                            handle.cancel("daemon_shutdown")
                nursery.cancel_scope.cancel()
        finally:
            self._ctx.term()

    def health(self) -> ExecutorHealth:
        return ExecutorHealth(
            spare_workers=sum(n.spare_workers for n in self.nodes.values()),
            zygote_restarts=sum(n.zygote_restarts for n in self.nodes.values()),
            nodes=[NodeStatus(node=n.info.node, host=n.info.host, active_runs=len(n.runs), spare_workers=n.spare_workers,
                              runs_started=n.runs_started) for n in self.nodes.values()],
            cluster=self.state,
            nodes_lost=self.nodes_lost,
        )

    # ---- runs ----------------------------------------------------------------------

    def start_run(self, spec: bytes, *, on_progress: Callable[[msgspec.Raw], None], deadline: float | None,
                  placement: str | None = None) -> RunHandle:
        assert self._runs_nursery is not None, "RayExecutor.run() is not running"
        handle = RunHandle(next(self._ids))
        self.active[handle.run_id] = handle
        self._runs_nursery.start_soon(self._run, handle, spec, on_progress, deadline, placement)
        return handle

    async def _run(self, handle: RunHandle, spec: bytes, on_progress, deadline: float | None, placement: str | None) -> None:
        node: _Node | None = None
        remote = _RemoteRun(handle, on_progress)
        try:
            with handle._scope:
                try:
                    node = await self._place(placement)
                except ClusterUnavailable as exc:
                    handle._settle(Unavailable(str(exc), category="transport"))
                    return
                node.runs[handle.run_id] = remote
                node.runs_started += 1
                timeout_s = None if deadline is None else max(0.0, deadline - trio.current_time())
                await node.send(RunOnNode(run=handle.run_id, spec=msgspec.Raw(spec), timeout_s=timeout_s))
                backstop = float("inf") if deadline is None else deadline + DEADLINE_BACKSTOP_S
                with trio.move_on_at(backstop) as waited:
                    await handle.settled.wait()
                if waited.cancelled_caught:
                    handle._settle(DeadlineExceeded())
        except Exception as exc:  # noqa: BLE001 — a run's failure is never the daemon's
            log.exception("run %d: supervision on the cluster failed", handle.run_id)
            handle._settle(Broken(f"supervision failed: {exc!r}"))
        finally:
            with trio.CancelScope(shield=True):
                if node is not None:
                    await self._end(node, remote)
                self.active.pop(handle.run_id, None)
                handle.cleaned_up.set()

    async def _end(self, node: _Node, remote: _RemoteRun) -> None:
        """See the run's processes gone on its node: ask its agent to end it, unless the
        agent ended it itself, and wait for the agent's cleanup record."""
        handle = remote.handle
        if not remote.agent_settled and not remote.cleaned.is_set():
            reason = getattr(handle.outcome, "reason", "ended")
            try:
                await node.send(CancelOnNode(run=handle.run_id, reason=reason))
            except (trio.ClosedResourceError, zmq.ZMQError):
                pass  # the node is going: its loss ends the run below
        with trio.move_on_after(self._teardown_s):
            await remote.cleaned.wait()
        node.runs.pop(handle.run_id, None)
        if remote.cleanup is None:
            remote.cleanup = CleanupReport(pid=0, ended_by="no_answer", reaped_after_ms=self._teardown_s * 1000,
                                           leftovers_killed=[], verified=False, node=node.info.node)
        handle.cleanup = remote.cleanup
        if not remote.cleanup.verified:
            event(log, "cleanup.unverified", logging.ERROR, node=node.info.node, run=handle.run_id, ended_by=remote.cleanup.ended_by)

    def _on_agent_frame(self, node: _Node, frame: FromAgent) -> None:
        if isinstance(frame, AgentHello):
            node.spare_workers, node.zygote_restarts = frame.spare_workers, frame.zygote_restarts
        elif isinstance(frame, CallAnswered):
            pending = node.calls.pop(frame.call, None)
            if pending is not None:
                pending[1].append(frame)
                pending[0].set()
        else:
            remote = node.runs.get(frame.run)
            if remote is None:
                return  # a run this daemon no longer waits for
            if isinstance(frame, RunProgress):
                if remote.handle.outcome is None:
                    remote.on_progress(frame.event)
            elif isinstance(frame, RunSettled):
                remote.agent_settled = True
                remote.handle._settle(self._outcome_of(node, frame))
            elif isinstance(frame, RunCleanedUp):
                remote.cleanup = self._cleanup_of(node, remote, frame)
                remote.cleaned.set()

    def _outcome_of(self, node: _Node, frame: RunSettled) -> RunOutcome:
        try:
            outcome = _outcome_decoder.decode(frame.outcome)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            return Broken(f"the agent on node {node.info.node} sent an outcome that does not decode: {exc}")
        if isinstance(outcome, Crashed):  # which node it crashed on is worth knowing
            return Crashed({**outcome.details, "node": node.info.node, "host": node.info.host})
        return outcome

    def _cleanup_of(self, node: _Node, remote: _RemoteRun, frame: RunCleanedUp) -> CleanupReport:
        try:
            report = _cleanup_decoder.decode(frame.cleanup)
        except (msgspec.DecodeError, UnicodeDecodeError):
            return CleanupReport(pid=0, ended_by="unknown", reaped_after_ms=0.0, leftovers_killed=[], verified=False, node=node.info.node)
        if report is None:  # no process ran there (no worker could be had)
            return CleanupReport(pid=0, ended_by="none", reaped_after_ms=0.0, leftovers_killed=[], verified=True, node=node.info.node)
        # Timed here, from the daemon's decision to the record's arrival: what a caller waits.
        ended_at = remote.handle._end_requested_at
        reaped_ms = (time.perf_counter() - ended_at) * 1000 if ended_at is not None else report.reaped_after_ms  # RunHandle's clock
        return msgspec.structs.replace(report, reaped_after_ms=reaped_ms, node=node.info.node)

    # ---- placement -----------------------------------------------------------------

    async def _place(self, placement: str | None, *, pin: bool = True) -> _Node:
        """The node for work on `placement`: its pinned node; else the least loaded (and,
        if `pin`, pinned to it from now on)."""
        if self.state == "connecting":
            with trio.move_on_after(FIRST_CONNECT_WAIT_S):
                while self.state == "connecting":
                    await self._state_changed.wait()
        if not self.nodes:  # with the bridge down, agents that still answer take runs
            if self.state != "up":
                raise ClusterUnavailable(f"the Ray cluster at {self._settings.address!r} is not reachable"
                                         + (f": {self.down_error}" if self.down_error else ""))
            raise ClusterUnavailable(f"the Ray cluster at {self._settings.address!r} has no node with a genvisor agent")
        if placement is None or self._workspaces == "shared":
            return self._least_loaded(list(self.nodes.values()))
        pinned = self._pins.get(placement)
        if pinned is None:
            node = self._least_loaded(list(self.nodes.values()))
            if pin:
                await self._pin(placement, node)
            return node
        holder = self._node_of(pinned)
        if holder is None:
            raise ClusterUnavailable(f"the node that holds workspace {placement} ({pinned.node} on {pinned.host}) is not in the cluster")
        return holder

    def _node_of(self, pin: Pin) -> _Node | None:
        """The pinned node; or, if it came back under a new id (a restarted raylet), a
        node on the same host: its disk, and so the workspace, are the same."""
        if pin.node in self.nodes:
            return self.nodes[pin.node]
        same_host = [n for n in self.nodes.values() if n.info.host == pin.host]
        return self._least_loaded(same_host) if same_host else None

    def _least_loaded(self, nodes: list[_Node]) -> _Node:
        fewest = min(len(n.runs) for n in nodes)
        tied = [n for n in nodes if len(n.runs) == fewest]
        return tied[next(self._placed) % len(tied)]  # ties go round

    async def _pin(self, workspace: str, node: _Node) -> None:
        self._pins[workspace] = Pin(node=node.info.node, host=node.info.host)  # first: the next run of it finds it at once
        if self._pins_path is not None:
            async with self._pins_written:  # one writer of the file at a time, each with every pin made so far
                try:
                    await trio.to_thread.run_sync(_write_pins, self._pins_path, dict(self._pins))
                except OSError as exc:  # the pin holds until a restart; the run goes on
                    event(log, "workspace.pins_unwritten", logging.ERROR, path=str(self._pins_path), error=str(exc))
        event(log, "workspace.pinned", workspace=workspace, node=node.info.node, host=node.info.host)

    # ---- workspace calls -----------------------------------------------------------

    def holds(self, workspace: str) -> bool:
        """Whether some node may hold what runs did to `workspace`: with workspaces on
        the nodes, only one a run was placed for (a pinned one); shared, any."""
        return self._workspaces == "shared" or workspace in self._pins

    async def call(self, workspace: str, op: str, args: list[Any], result_type: type[T]) -> T:
        """Call workspace function `op` on the node holding `workspace` (in a thread
        there), or raise ClusterUnavailable. A call pins nothing: only runs do."""
        node = await self._place(workspace, pin=False)
        call = next(self._calls)
        done, answer = trio.Event(), list[CallAnswered]()
        node.calls[call] = (done, answer)
        try:
            await node.send(CallOnNode(call=call, op=op, args=msgspec.Raw(_encoder.encode(args))))
            with trio.move_on_after(CALL_TIMEOUT_S):
                await done.wait()
        finally:
            node.calls.pop(call, None)
        if not answer:
            raise ClusterUnavailable(f"the node {node.info.node} did not answer the workspace call {op!r}")
        if answer[0].error is not None:
            raise RuntimeError(f"on node {node.info.node}: {answer[0].error}")
        return msgspec.msgpack.decode(answer[0].result, type=result_type)

    # ---- the bridge and the nodes --------------------------------------------------

    async def _keep_bridge(self) -> None:
        """A bridge, always: started again when it ends. The agents outlive a bridge
        (their actors are detached), so their nodes stay while they answer: a bridge
        gone costs no run; agents that went with the cluster fall silent and are lost."""
        failures = 0
        while True:
            up = await self._run_bridge()
            failures = 0 if up else failures + 1
            self._set_state("down")
            await trio.sleep(BRIDGE_RESTART_S[min(failures, len(BRIDGE_RESTART_S) - 1)])

    async def _run_bridge(self) -> bool:
        """Start a bridge and serve what it says until it exits; whether it connected."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        os.set_inheritable(theirs.fileno(), True)
        argv = [sys.executable, "-m", "genvisor.supervisor.ray_bridge", str(theirs.fileno()), str(os.getpid()),
                msgspec.json.encode(self._settings_for_agents()).decode()]
        # posix_spawn from the main thread: PDEATHSIG is tied to the thread that forked.
        pid = os.posix_spawn(sys.executable, argv, dict(os.environ),
                             file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)])
        theirs.close()
        event(log, "cluster.bridge_started", pid=pid, address=self._settings.address)
        channel: FramedChannel[FromBridge] = FramedChannel(trio.SocketStream(trio.socket.from_stdlib_socket(ours)), FromBridge)
        self._bridge = channel
        connected = False
        try:
            while (frame := await channel.receive()) is not None:
                if isinstance(frame, ClusterUp):
                    connected = True
                    self.down_error = ""
                    listed = {info.node for info in frame.nodes}
                    for node in [n for n in self.nodes if n not in listed]:
                        self._lose(node, "not_in_the_cluster")  # the bridge found no agent of ours there
                    for info in frame.nodes:
                        await self._connect(info)
                    self._set_state("up")
                    event(log, "cluster.connected", address=frame.address, nodes=len(frame.nodes))
                elif isinstance(frame, NodeJoined):
                    await self._connect(frame.info)
                elif isinstance(frame, NodeLost):
                    self._lose(frame.node, frame.reason)
                elif isinstance(frame, ClusterDown):
                    self.down_error = frame.error
                    event(log, "cluster.down", logging.ERROR, error=frame.error)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            event(log, "cluster.bridge_protocol_error", logging.ERROR, error=str(exc))
        finally:
            with trio.CancelScope(shield=True):
                self._bridge = None
                channel.close()  # a bridge still running sees that, disconnects from Ray and exits
                with trio.move_on_after(BRIDGE_STOP_S):
                    await wait_for_exit(pid)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await wait_for_exit(pid)
                os.waitpid(pid, 0)
        if not self.down_error:
            self.down_error = "the bridge to the cluster exited"
        return connected

    def _settings_for_agents(self) -> BridgeSettings:
        agent = msgspec.structs.replace(self._settings.agent, daemon_key=self._keys[0].decode())
        return msgspec.structs.replace(self._settings, agent=agent)

    def _set_state(self, state: Literal["connecting", "up", "down"]) -> None:
        self.state = state
        self._state_changed.set()
        self._state_changed = trio.Event()

    async def _connect(self, info: NodeInfo) -> None:
        known = self.nodes.get(info.node)
        if known is not None:
            if known.info == info:
                return  # the agent a previous bridge started: its runs went on
            self._lose(info.node, "agent_replaced")
        assert self._ctx is not None and self._nursery is not None
        raw = daemon_socket(self._ctx, info.agent, info.agent_key, self._keys)
        ready = trio.Event()
        self._nursery.start_soon(self._serve_node, info, raw, ready)
        await ready.wait()
        event(log, "node.joined", node=info.node, host=info.host, agent=info.agent)

    async def _serve_node(self, info: NodeInfo, raw: zmq.Socket[bytes], ready: trio.Event) -> None:
        async with TrioSocket.open(raw) as sock:
            node = _Node(info, sock, trio.current_time())
            self.nodes[info.node] = node
            ready.set()
            with node.scope:
                while True:
                    [data] = await sock.recv_multipart()
                    node.heard_at = trio.current_time()
                    try:
                        frame = _agent_decoder.decode(data)
                    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                        event(log, "node.protocol_error", logging.ERROR, node=info.node, error=str(exc))
                        continue
                    self._on_agent_frame(node, frame)

    async def _watch_silence(self) -> None:
        """Every HEARTBEAT_S: ping each agent (one that hears nothing from its daemon
        ends its runs), and give up those not heard from for AGENT_SILENT_S."""
        while True:
            await trio.sleep(HEARTBEAT_S)
            now = trio.current_time()
            for node in list(self.nodes.values()):
                try:
                    node.sock.try_send_multipart([_PING])
                except (trio.ClosedResourceError, zmq.ZMQError):
                    pass  # closing: lost below, or already
            for node in list(self.nodes.values()):
                if now - node.heard_at > AGENT_SILENT_S:
                    reason = f"agent_silent ({AGENT_SILENT_S:g} s)"
                    self._lose(node.info.node, reason)
                    # Its runs are ended here: have Ray end its agent (and so them) there, and start another.
                    if self._bridge is not None:
                        try:
                            await self._bridge.send(DropNode(node=node.info.node, reason=reason))
                        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                            pass  # the bridge is gone: its actors, and so that agent, go with it

    def _lose(self, node_id: str, reason: str) -> None:
        """The node is gone: each of its runs ends, once, as lost with it."""
        node = self.nodes.pop(node_id, None)
        if node is None:
            return
        node.scope.cancel()
        self.nodes_lost += 1
        event(log, "node.lost", logging.WARNING, node=node_id, host=node.info.host, reason=reason, runs=len(node.runs))
        for remote in node.runs.values():
            remote.handle._settle(Crashed({"reason": "node_lost", "node": node_id, "host": node.info.host, "lost": reason}))
            if remote.cleanup is None:
                remote.cleanup = CleanupReport(pid=0, ended_by="node_lost", reaped_after_ms=0.0, leftovers_killed=[],
                                               verified=False, node=node_id)
            remote.cleaned.set()
        for done, _ in node.calls.values():
            done.set()  # unanswered: the caller raises


class Pin(msgspec.Struct, frozen=True):
    node: str
    host: str


def _read_pins(path: Path | None) -> dict[str, Pin]:
    if path is None:
        return {}
    try:
        return msgspec.json.decode(path.read_bytes(), type=dict[str, Pin])
    except FileNotFoundError:
        return {}
    except (OSError, msgspec.DecodeError) as exc:  # a file that cannot be read pins nothing: say so, and go on
        event(log, "workspace.pins_unreadable", logging.ERROR, path=str(path), error=str(exc))
        return {}


def _write_pins(path: Path, pins: dict[str, Pin]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(msgspec.json.format(msgspec.json.encode(pins)))
    os.replace(temporary, path)  # whole or not at all
