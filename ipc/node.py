"""Frames of the cluster plane: the daemon ⇄ a node's agent, and the daemon ⇄ its
cluster bridge (see supervisor.cluster).

On a cluster, a node's agent runs the node's runs with the same zygote, pool and
supervision as a local daemon; these frames carry what the daemon and the agent say
of them. A run's spec, events and outcome stay opaque (`msgspec.Raw`), as on the
worker channel; so do a workspace call's arguments and result.
"""

from __future__ import annotations

import msgspec

# ---- daemon ⇄ agent: one msgpack frame per ZeroMQ message (DEALER ⇄ DEALER, tcp) --------


class RunOnNode(msgspec.Struct, frozen=True, tag=True):
    """Run `spec` in a fresh worker of this node; end it after `timeout_s` (None: never)."""

    run: int
    spec: msgspec.Raw
    timeout_s: float | None


class CancelOnNode(msgspec.Struct, frozen=True, tag=True):
    run: int
    reason: str


class CallOnNode(msgspec.Struct, frozen=True, tag=True):
    """Call the agent's workspace function `op` with `args` (a msgpack array), in a thread."""

    call: int
    op: str
    args: msgspec.Raw


class DaemonPing(msgspec.Struct, frozen=True, tag=True):
    """Sent every `HEARTBEAT_S`: the daemon is alive. An agent that hears nothing from
    it for `DAEMON_SILENT_S` ends its runs and exits (its daemon was killed)."""


ToAgent = RunOnNode | CancelOnNode | CallOnNode | DaemonPing


class AgentHello(msgspec.Struct, frozen=True, tag=True):
    """Sent on connecting, and every `HEARTBEAT_S` after: the agent is alive."""

    node: str
    pid: int
    spare_workers: int
    zygote_restarts: int


class RunProgress(msgspec.Struct, frozen=True, tag=True):
    run: int
    event: msgspec.Raw


class RunSettled(msgspec.Struct, frozen=True, tag=True):
    """The run's one outcome (a supervisor.runs outcome, msgpack)."""

    run: int
    outcome: msgspec.Raw


class RunCleanedUp(msgspec.Struct, frozen=True, tag=True):
    """The run's processes are gone; `cleanup` is its CleanupReport, or nil if no
    process ran (msgpack either way: a Raw cannot be one arm of a union)."""

    run: int
    cleanup: msgspec.Raw


class CallAnswered(msgspec.Struct, frozen=True, tag=True):
    """The call's result (msgpack), or its `error` (then the result is nil)."""

    call: int
    result: msgspec.Raw
    error: str | None = None


FromAgent = AgentHello | RunProgress | RunSettled | RunCleanedUp | CallAnswered

HEARTBEAT_S = 1.0
DAEMON_SILENT_S = 10.0
ORPHANED_EXIT = 75  # the agent's exit status when it gave its daemon up

# ---- bridge ⇄ daemon: length-prefixed frames on a socketpair ---------------------------


class NodeInfo(msgspec.Struct, frozen=True):
    node: str  # Ray's node id (hex)
    host: str  # the node's address
    agent: str  # the agent's ZeroMQ endpoint, tcp://host:port
    agent_key: str  # the agent's CURVE public key (z85)


class ClusterUp(msgspec.Struct, frozen=True, tag=True):
    """Connected to the cluster; `nodes` are its agents now (more come as NodeJoined)."""

    address: str
    nodes: list[NodeInfo]


class NodeJoined(msgspec.Struct, frozen=True, tag=True):
    info: NodeInfo


class NodeLost(msgspec.Struct, frozen=True, tag=True):
    node: str
    reason: str


class ClusterDown(msgspec.Struct, frozen=True, tag=True):
    """The bridge could not reach the cluster, or lost it; it exits after this."""

    error: str


FromBridge = ClusterUp | NodeJoined | NodeLost | ClusterDown

# ---- daemon → bridge -----------------------------------------------------------------


class DropNode(msgspec.Struct, frozen=True, tag=True):
    """The daemon gave the node up (its agent went silent): end its agent, whose runs
    the daemon has ended already, and start a fresh one there."""

    node: str
    reason: str


ToBridge = DropNode
