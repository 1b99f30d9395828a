"""`genvisor serve`: the daemon process — the ZeroMQ front and the supervision tree.

    serve (trio.run)
    └─ executor           RayExecutor (runs on a cluster's nodes), first: the nodes hold workspaces
       └─ nursery         (once the journal is loaded and the endpoint bound)
          ├─ supervisor   or, on this machine: zygote, spare workers, runs
          ├─ service      conversations, generations, change sets, outcome retention
          ├─ front        ROUTER: receive → dispatch → one outgoing queue → send
          ├─ signals      SIGTERM/SIGINT → graceful shutdown
          └─ watchdog     sd_notify WATCHDOG=1 under systemd (READY/STOPPING too)

Every frame is answered: a frame that does not decode gets `BadRequest`, a handler
bug gets `InternalError` with an incident id that is also logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys

import trio
import zmq

from genvisor import __version__
from genvisor.daemon import logs
from genvisor.daemon.config import Config
from genvisor.daemon.front import Front, open_front
from genvisor.daemon.metrics import MetricsServer
from genvisor.daemon.pidlock import LockHeld, lock_exclusively
from genvisor.daemon.sd_notify import Notifier
from genvisor.daemon.service_dirs import runtime_directory
from genvisor.daemon.store import StoreFailed
from genvisor.errors import BadRequest
from genvisor.ipc import codec
from genvisor.ipc.curve import CurveError, secure_server_socket, server_curve
from genvisor.ipc.endpoint import (
    Endpoint,
    EndpointError,
    default_endpoint,
    parse_endpoint,
    prepare_private_dir,
    probe_socket,
    secure_ipc_socket,
)
from genvisor.ipc.frames import HARD_MAX_FRAME_BYTES
from genvisor.ipc.router import RouterOutbox, configure_router
from genvisor.ipc.trio_zmq import TrioSocket
from genvisor.logevent import event
from genvisor.modes.loop import TurnTarget
from genvisor.supervisor.cluster import RayExecutor
from genvisor.supervisor.node_agent import AgentSettings
from genvisor.supervisor.pool import WorkerPool
from genvisor.supervisor.ray_bridge import BridgeSettings
from genvisor.supervisor.runs import Supervisor
from genvisor.supervisor.worker import target_name

log = logging.getLogger("genvisor.daemon")

WORKER_TARGET = TurnTarget  # what every worker runs
NODE_CALLS = "genvisor.modes.workspace_snapshot:NODE_CALLS"  # the workspace work a cluster node does for the daemon


async def _serve_socket(sock: TrioSocket, front: Front, outbox: RouterOutbox) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        nursery.start_soon(front.pump, outbox.put)
        while True:
            frames = await sock.recv_multipart()
            if len(frames) != 2:
                problem = BadRequest(f"expected 1 frame per request, got {len(frames) - 1}")
                front.reject(frames[0], codec.peek_request_id(frames[1]), problem)
                continue
            try:
                front.receive(nursery, frames[0], frames[1])
            except Exception:  # noqa: BLE001 — a bug here must not stop the daemon
                log.exception("unexpected error receiving a frame")


def ray_executor(config: Config) -> RayExecutor:
    """Runs on the Ray cluster `[executor]` names; each node's agent runs them with the
    `[workers]` settings, the `spares` per node."""
    state = config.state_path().resolve()
    agent = AgentSettings(
        node="", host="", daemon_key="", target=target_name(WORKER_TARGET), calls=NODE_CALLS, preload=config.worker_preload(),
        spares=config.workers.spares, cancel_grace_s=config.workers.cancel_grace_ms / 1000,
        term_grace_s=config.workers.term_grace_ms / 1000, instance=str(state),
    )
    namespace = "genvisor-" + hashlib.sha256(str(state).encode()).hexdigest()[:12]  # one daemon per state dir
    settings = BridgeSettings(address=config.executor.address, namespace=namespace, agent=agent)
    teardown_s = (config.workers.cancel_grace_ms + config.workers.term_grace_ms) / 1000 + 5.0
    return RayExecutor(settings, workspaces=config.executor.workspaces, pins=state / "cluster-workspaces.json", teardown_s=teardown_s)


def resolve_endpoint(config: Config) -> Endpoint:
    return parse_endpoint(config.endpoint) if config.endpoint else default_endpoint(runtime_directory())


async def serve(config: Config) -> int:
    notifier = Notifier.from_environ(os.environ, os.getpid())  # before the zygote inherits the environment
    endpoint = resolve_endpoint(config)
    curve = server_curve(endpoint, config.security.server_secret_key_file, config.security.authorized_clients_dir)
    store = await trio.to_thread.run_sync(config.open_store)  # first: it holds the state dir's lock
    endpoint_lock: int | None = None
    pool: WorkerPool | None = None
    if config.executor.kind == "ray":
        supervisor: Supervisor | RayExecutor = ray_executor(config)
    else:
        pool = WorkerPool(
            target=WORKER_TARGET, spares=config.workers.spares, preload=config.worker_preload(),
            instance=str(config.state_path().resolve()),  # one daemon per state dir: the journal's lock
        )
        supervisor = Supervisor(
            pool,
            cancel_grace_s=config.workers.cancel_grace_ms / 1000,
            term_grace_s=config.workers.term_grace_ms / 1000,
        )
    metrics: MetricsServer | None = None
    ctx = zmq.Context()
    authenticator = None
    refused: Exception | None = None
    try:
        async with trio.open_nursery() as executor:
            # A cluster's agents hold the workspaces that open_front settles (the runs a
            # previous daemon left unfinished): reach them first. Local workers start once
            # the start can no longer be refused (a refusal is one line, and starts nothing).
            if pool is None:
                await executor.start(supervisor.run)
            try:
                front = await open_front(config, supervisor, str(endpoint), store)
                if endpoint.scheme == "ipc":
                    endpoint_lock = claim_ipc_endpoint(endpoint, config.ipc_group_access)
                router = ctx.socket(zmq.ROUTER)
                router.setsockopt(zmq.MAXMSGSIZE, HARD_MAX_FRAME_BYTES)
                router.setsockopt(zmq.LINGER, 0)
                configure_router(router)
                authenticator = secure_server_socket(ctx, router, curve) if curve else None
                try:
                    router.bind(str(endpoint))
                except zmq.ZMQError as exc:
                    router.close(linger=0)
                    raise EndpointError(f"cannot listen on {endpoint}: {exc}") from None
                if endpoint.scheme == "ipc":
                    secure_ipc_socket(endpoint, config.ipc_group_access)
            except (CurveError, EndpointError, StoreFailed) as exc:
                # Refused before serving: raised below, outside the executor's nursery (which would wrap it in a group).
                refused = exc
            else:
                async with TrioSocket.open(router) as sock:
                    outbox = RouterOutbox(sock, on_done=front.delivered)
                    service = front.service
                    if pool is not None:
                        pool.on_spawn = service.telemetry.worker_spawn_seconds.observe
                    if config.metrics:
                        metrics = MetricsServer(config.metrics, service.telemetry.registry)
                        front.metrics_address = metrics.address
                        event(log, "metrics.serving", url=f"http://{metrics.address}/metrics")
                    async with trio.open_nursery() as nursery:
                        stop, serving = trio.Event(), trio.Event()
                        await nursery.start(_watch_signals, stop, serving, nursery.cancel_scope)
                        if pool is not None:
                            await nursery.start(supervisor.run)
                        await nursery.start(service.run)
                        nursery.start_soon(_serve_socket, sock, front, outbox)
                        serving.set()
                        event(log, "daemon.serving", version=__version__, endpoint=str(endpoint), pid=os.getpid(), journal=store.describe())
                        print(f"genvisor {__version__} listening on {endpoint}", file=sys.stderr, flush=True)
                        notifier.ready(f"serving on {endpoint}")
                        nursery.start_soon(notifier.keep_watchdog)
                        await stop.wait()
                        notifier.stopping(f"stopping: canceling {len(supervisor.active)} active runs")
                        service.generations.shutdown()
                        await _drain_and_stop(nursery, supervisor, front, outbox)
            executor.cancel_scope.cancel()
        if refused is not None:
            raise refused
    finally:
        if authenticator is not None:
            authenticator.stop()  # its sockets must close before ctx.term() can return
        ctx.term()
        if endpoint_lock is not None:
            release_ipc_endpoint(endpoint, endpoint_lock)
        with trio.CancelScope(shield=True):
            if metrics is not None:
                await trio.to_thread.run_sync(metrics.close)
            await trio.to_thread.run_sync(store.close)
    event(log, "daemon.stopped")
    return 0


def claim_ipc_endpoint(endpoint: Endpoint, group_access: bool) -> int:
    """Make the socket path ours for as long as the returned fd is open: a lock next to
    it says a daemon serves there. A second daemon is refused, naming the first, instead
    of removing a live daemon's socket (ZeroMQ's bind would replace it silently); a
    socket a killed daemon left behind is removed."""
    prepare_private_dir(endpoint.path.parent, group_access)
    try:
        fd = lock_exclusively(endpoint.path.with_name(endpoint.path.name + ".lock"))
    except LockHeld as held:
        raise EndpointError(f"another genvisor daemon (pid {held.holder}) is serving on {endpoint}; "
                            "stop it, or give this one another --endpoint") from None
    except OSError as exc:
        raise EndpointError(f"cannot use {endpoint.path.parent} for the socket: {exc.strerror or exc}") from None
    if probe_socket(endpoint.path) == "listening":  # a daemon that takes no lock (an older genvisor), or another program
        os.close(fd)
        raise EndpointError(f"something is already listening on {endpoint}; stop it, or give this daemon another --endpoint")
    endpoint.path.unlink(missing_ok=True)  # a stale socket of a previous daemon (we own the dir)
    return fd


def release_ipc_endpoint(endpoint: Endpoint, lock: int) -> None:
    endpoint.path.unlink(missing_ok=True)  # before the lock: a successor may bind once it has it
    os.close(lock)


async def _watch_signals(stop: trio.Event, serving: trio.Event, scope: trio.CancelScope, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """SIGTERM/SIGINT: a graceful stop; during start-up, abandon the start."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            event(log, "daemon.stopping", signal=signal.Signals(signum).name)
            stop.set()
            if not serving.is_set():
                scope.cancel()


async def _drain_and_stop(nursery: trio.Nursery, supervisor: Supervisor | RayExecutor, front: Front, outbox: RouterOutbox) -> None:
    # Runs are canceled; their teardown (grace + kill) is bounded by the worker config,
    # and then their workspaces are undone and journaled before the journal stops.
    await front.service.generations.drained()
    while supervisor.active:
        handle = next(iter(supervisor.active.values()))
        await handle.cleaned_up.wait()
    with trio.move_on_after(5):  # a client that reads nothing does not hold the stop up longer
        await front.flush()  # owners get their GenerationCanceled before we go
        await outbox.drained()
    nursery.cancel_scope.cancel()


def main(config: Config) -> int:
    logs.configure(config.log_format)
    try:
        return trio.run(serve, config)
    except (CurveError, EndpointError, StoreFailed) as exc:  # refused at start-up, before serving
        print(f"genvisor serve: {exc}", file=sys.stderr)
        return 2
    except BaseExceptionGroup as group:
        failed, rest = group.split(StoreFailed)
        if failed is None:
            raise
        # Crash-only: memory is ahead of the disk, so stop; a restart recovers from
        # the last durable state and resolves the runs this one had in flight.
        log.critical("stopping: %s", failed.exceptions[0])
        if rest is not None:
            log.error("and while stopping", exc_info=rest)
        return 1
