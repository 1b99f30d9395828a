"""The daemon's bridge to a Ray cluster: the Ray driver, in a process of its own.

Ray places the work and watches the nodes; the daemon stays out of Ray's way. Its
driver lives here and not in the daemon because a driver that loses its cluster is
ended by Ray itself (and holds a dozen threads and ≈150 MB the daemon does not want).
The bridge starts one `NodeAgentActor` on every node, pinned there (node affinity,
no CPU reserved), whose agent process (supervisor.node_agent) runs the node's runs;
it tells the daemon where each agent listens, and when a node joins or is lost. The
actors are detached and named after their node: a bridge that Ray ended (its GCS out
of reach) costs no run, as the next one finds them, runs and all; the bridge ends them
when the daemon stops, and an agent whose daemon was killed ends itself (it hears no
more pings), and its actor with it.

Plain blocking Python, talking to the daemon in length-prefixed frames on a socket
it inherits (ipc.node, bridge ⇄ daemon). It dies with the daemon (PDEATHSIG).

Run as: python -m genvisor.supervisor.ray_bridge CHANNEL_FD DAEMON_PID SETTINGS_JSON
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import msgspec

from genvisor.ipc.channel import FrameReader, pack_frame
from genvisor.ipc.node import ORPHANED_EXIT, ClusterDown, ClusterUp, FromBridge, NodeInfo, NodeJoined, NodeLost, ToBridge
from genvisor.supervisor import linux
from genvisor.supervisor.node_agent import AgentSettings

# How often the cluster's membership is read, and how long an agent may take to start
# (a cold interpreter, the zygote and its first spare, on a loaded node).
WATCH_S = 0.5
AGENT_START_TIMEOUT_S = 60.0
# A driver whose cluster went away retries for this long (Ray's default is 60 s) before
# Ray ends it: then the daemon knows, and new runs fail at once instead of hanging.
GCS_RECONNECT_TIMEOUT_S = 5


class BridgeSettings(msgspec.Struct, frozen=True):
    address: str  # "auto", "local", "ray://…" or host:port
    namespace: str  # one per daemon: its actors are its own
    agent: AgentSettings  # node and host are filled in on each node


_encoder = msgspec.msgpack.Encoder()
_daemon_decoder = msgspec.msgpack.Decoder(ToBridge)


class NodeAgentActor:
    """One per node: starts the node's agent and answers where it listens."""

    def __init__(self, settings: bytes) -> None:
        import ray

        agent = msgspec.json.decode(settings, type=AgentSettings)
        self._daemon_key = agent.daemon_key
        context = ray.get_runtime_context()
        node = context.get_node_id()
        # The processes of this agent are marked as its own, not only as the daemon's:
        # nodes may share a machine, and an agent kills what it finds marked at start.
        instance = f"{agent.instance}@{node}" if agent.instance else None
        agent = msgspec.structs.replace(agent, node=node, host=ray.util.get_node_ip_address(), instance=instance)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "genvisor.supervisor.node_agent", msgspec.json.encode(agent).decode()],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        self._info = NodeInfo(node=agent.node, host=agent.host, agent="", agent_key="")
        if line:
            started = json.loads(line)
            self._info = msgspec.structs.replace(self._info, agent=started["endpoint"], agent_key=started["key"])

    def info(self) -> bytes:
        if not self._info.agent:
            raise RuntimeError(f"the agent on node {self._info.node} did not start (exit status {self._process.poll()})")
        return msgspec.msgpack.encode(self._info)

    def daemon_key(self) -> str:
        return self._daemon_key

    def watch(self) -> int:
        """Returns when the agent exits (its exit status); fails when the node is lost."""
        status = self._process.wait()
        if status == ORPHANED_EXIT:
            # Its daemon is gone, and its bridge with it: nobody will kill this detached
            # actor, so it ends itself once this call has answered.
            threading.Timer(1.0, os._exit, (0,)).start()
        return status

    def stop_agent(self) -> None:
        """SIGKILL the agent (stopped or stuck, it cannot see its actor go): its zygote,
        told by PDEATHSIG, kills its runs."""
        self._process.kill()
        self._process.wait()


def main(argv: list[str]) -> int:
    channel_fd, daemon_pid, settings = int(argv[0]), int(argv[1]), msgspec.json.decode(argv[2], type=BridgeSettings)
    linux.die_with_parent(daemon_pid)
    channel = socket.socket(fileno=channel_fd)
    os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(GCS_RECONNECT_TIMEOUT_S))
    try:
        import ray

        if settings.address == "local":
            ray.init(namespace=settings.namespace, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        else:
            ray.init(address=settings.address, namespace=settings.namespace, log_to_driver=False, logging_level=logging.ERROR)
    except Exception as exc:  # noqa: BLE001 — whatever stops the connection is the daemon's to report
        _send(channel, ClusterDown(error=f"cannot connect to the Ray cluster at {settings.address!r}: {type(exc).__name__}: {exc}"))
        return 1
    bridge = _Bridge(ray, channel, settings)
    try:
        bridge.serve()
    except Exception as exc:  # noqa: BLE001 — the cluster went away: say so, and let the daemon start another bridge
        _send(channel, ClusterDown(error=f"lost the Ray cluster at {settings.address!r}: {type(exc).__name__}: {exc}"))
        return 1
    # The daemon is stopping: its agents, and their runs, end (a Ray of our own,
    # address "local", stops altogether).
    bridge.stop()
    ray.shutdown()
    return 0


class _Bridge:
    """Keeps one agent on every live node, and tells the daemon of each change."""

    def __init__(self, ray: Any, channel: socket.socket, settings: BridgeSettings) -> None:
        self._ray = ray
        self._channel = channel
        self._address = settings.address
        self._actor_class: Any = ray.remote(NodeAgentActor)  # Ray's stubs cannot follow .options(...).remote(...)
        self._agent_settings = msgspec.json.encode(settings.agent)
        self._agents: dict[str, tuple[Any, Any]] = {}  # node id → (actor, its watch call)
        self._daemon_key = settings.agent.daemon_key

    def serve(self) -> None:
        """Until the daemon closes its end."""
        reader, first = FrameReader(), True
        while (dropped := _read_daemon(self._channel, reader)) is not None:
            alive = {n["NodeID"] for n in self._ray.nodes() if n["Alive"]}
            self._forget(alive, dropped)
            joined = self._start_agents(alive - self._agents.keys())
            if first:
                _send(self._channel, ClusterUp(address=self._address, nodes=joined))
                first = False
            else:
                for info in joined:
                    _send(self._channel, NodeJoined(info=info))
            self._watch()

    def _forget(self, alive: set[str], dropped: dict[str, str]) -> None:
        """The agents of nodes gone, and those the daemon dropped (a fresh one is started there)."""
        for node in list(self._agents):
            if node not in alive:
                self._lose(node, "node_lost")
            elif node in dropped:
                actor, _ = self._agents[node]
                try:
                    self._ray.get(actor.stop_agent.remote(), timeout=AGENT_START_TIMEOUT_S)
                except Exception as exc:  # noqa: BLE001 — killing its actor (in _lose) is the last resort
                    print(f"genvisor-bridge: could not stop the agent on node {node}: {exc}", file=sys.stderr, flush=True)
                self._lose(node, dropped[node])

    def _start_agents(self, nodes: set[str]) -> list[NodeInfo]:
        """An agent on each of `nodes`, pinned there: the one this daemon's last bridge
        started, if it is still there (its runs go on), else a new one; those that started."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        started = {}
        for node in nodes:
            name = f"genvisor-agent-{node}"
            started[node] = self._ours(name) or self._actor_class.options(
                # Detached: it outlives this bridge (a lost GCS ends a driver), so a
                # restarted bridge finds it, runs and all. No CPU held: the agent's runs
                # are what the node's capacity is for.
                name=name, lifetime="detached", num_cpus=0, max_concurrency=2, max_restarts=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
            ).remote(self._agent_settings)
        joined = []
        for node, actor in started.items():
            try:
                info = msgspec.msgpack.decode(self._ray.get(actor.info.remote(), timeout=AGENT_START_TIMEOUT_S), type=NodeInfo)
            except Exception as exc:  # noqa: BLE001 — a node whose agent cannot start is left out, and tried again
                print(f"genvisor-bridge: no agent on node {node}: {exc}", file=sys.stderr, flush=True)
                self._ray.kill(actor)
                continue
            self._agents[node] = (actor, actor.watch.remote())
            joined.append(info)
        return joined

    def _ours(self, name: str) -> Any:
        """The named agent actor, if this daemon started it; one a previous daemon (of
        this state dir: the same namespace) left is ended, and its name freed."""
        try:
            actor = self._ray.get_actor(name)
        except ValueError:
            return None
        try:
            if self._ray.get(actor.daemon_key.remote(), timeout=AGENT_START_TIMEOUT_S) == self._daemon_key:
                return actor
        except Exception:  # noqa: BLE001 — dying or stuck: ended below
            pass
        self._ray.kill(actor)
        deadline = time.monotonic() + AGENT_START_TIMEOUT_S
        while time.monotonic() < deadline:  # the name is freed once the actor is dead
            try:
                self._ray.get_actor(name)
            except ValueError:
                break
            time.sleep(0.1)
        return None

    def stop(self) -> None:
        """The daemon is stopping: end its agents (detached, they would not end with it)."""
        for node in list(self._agents):
            self._lose(node, "daemon_stopping")

    def _watch(self) -> None:
        """Wait up to WATCH_S for an agent to end (its watch call returns, or fails with its node)."""
        watches = {watch: node for node, (_, watch) in self._agents.items()}
        if not watches:
            time.sleep(WATCH_S)
            return
        ended, _ = self._ray.wait(list(watches), num_returns=1, timeout=WATCH_S)
        for watch in ended:
            try:
                reason = f"agent_exited ({self._ray.get(watch)})"
            except Exception:  # noqa: BLE001 — the actor died: its node, most often
                reason = "node_lost"
            self._lose(watches[watch], reason)

    def _lose(self, node: str, reason: str) -> None:
        actor, _ = self._agents.pop(node)
        try:
            self._ray.kill(actor)
        except Exception:  # noqa: BLE001 — gone already
            pass
        _send(self._channel, NodeLost(node=node, reason=reason))


def _read_daemon(channel: socket.socket, reader: FrameReader) -> dict[str, str] | None:
    """What the daemon said since the last look, without waiting: the nodes it dropped
    (and why), or None once it closed its end (it is stopping)."""
    dropped: dict[str, str] = {}
    while True:
        try:
            data = channel.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        except OSError:
            return None
        if not data:
            return None
        reader.feed(data)
    while (frame := reader.next_frame()) is not None:
        drop = _daemon_decoder.decode(frame)
        dropped[drop.node] = drop.reason
    return dropped


def _send(channel: socket.socket, frame: FromBridge) -> None:
    try:
        channel.sendall(pack_frame(_encoder.encode(frame)))
    except OSError:
        pass  # the daemon is gone: nobody is left to tell


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
