"""`genvisor serve`: the daemon process — the ZeroMQ front and the supervision tree.

    serve (trio.run)
    └─ nursery
       ├─ supervisor      zygote, spare workers, runs
       ├─ runtime         conversations, generations, outcome retention
       ├─ front           ROUTER: receive → dispatch → one outgoing queue → send
       └─ signals         SIGTERM/SIGINT → graceful shutdown

Every frame is answered: a frame that does not decode gets `BadRequest`, a handler
bug gets `InternalError` with an incident id that is also logged.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import signal
import sys
import time
from typing import Any

import trio
import zmq

from genvisor import __version__
from genvisor.daemon.config import Config
from genvisor.daemon.runtime import Runtime
from genvisor.errors import BadRequest, GenvisorError, InternalError
from genvisor.ipc import codec
from genvisor.ipc.endpoint import Endpoint, default_endpoint, parse_endpoint, prepare_private_dir, secure_ipc_socket
from genvisor.ipc.frames import (
    HARD_MAX_FRAME_BYTES,
    AwaitGeneration,
    CancelGeneration,
    ConversationAndResult,
    Empty,
    GenerateAssistantReply,
    GenerationRef,
    GetConversation,
    Ping,
    SendAndGenerate,
    SendUserMessage,
)
from genvisor.ipc.trio_zmq import TrioSocket
from genvisor.modes.assemble import Defaults
from genvisor.supervisor.pool import WorkerPool
from genvisor.supervisor.runs import Supervisor
from genvisor.types import DaemonInfo, Notification

log = logging.getLogger("genvisor.daemon")

WORKER_TARGET = "genvisor.modes.runtime:execute"


class Front:
    """Frames in, handler calls, frames out — through one queue, so a client sees its
    notifications in the order they were produced."""

    def __init__(self, sock: TrioSocket, runtime: Runtime, endpoint: Endpoint) -> None:
        self._sock = sock
        self._runtime = runtime
        self._endpoint = endpoint
        self._started = time.monotonic()
        self._outbox_send, self._outbox = trio.open_memory_channel[list[bytes]](math.inf)
        self.frames_rejected = 0

    def notify(self, owner: Any, note: Notification) -> None:
        self._outbox_send.send_nowait([owner, codec.encode_notification(note)])

    async def serve(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._send_loop)
            while True:
                frames = await self._sock.recv_multipart()
                try:
                    self._dispatch(nursery, frames)
                except Exception as exc:  # noqa: BLE001 — a bug here must not stop the daemon
                    self._fail(frames[0], 0, exc)

    async def _send_loop(self) -> None:
        async for frames in self._outbox:
            if isinstance(frames, trio.Event):
                frames.set()  # a flush marker: everything queued before it is sent
                continue
            await self._sock.send_multipart(frames)

    async def flush(self) -> None:
        marker = trio.Event()
        self._outbox_send.send_nowait(marker)  # type: ignore[arg-type]
        await marker.wait()

    def _dispatch(self, nursery: trio.Nursery, frames: list[bytes]) -> None:
        identity = frames[0]
        if len(frames) != 2:
            self._reject(identity, 0, BadRequest(f"expected 1 frame per request, got {len(frames) - 1}"))
            return
        try:
            frame = codec.decode_request(frames[1])
        except codec.BadRequestFrame as exc:
            self._reject(identity, exc.request_id, exc)
            return
        request = frame.req
        if isinstance(request, (AwaitGeneration, SendAndGenerate)):
            nursery.start_soon(self._answer_async, identity, frame.id, request)
            return
        self._answer(identity, frame.id, lambda: self._handle(identity, request))

    def _handle(self, identity: bytes, request: Any) -> Any:
        runtime = self._runtime
        if isinstance(request, Ping):
            return DaemonInfo(__version__, os.getpid(), time.monotonic() - self._started, str(self._endpoint))
        if isinstance(request, SendUserMessage):
            return runtime.send_user_message(request.loc, request.content, request.metadata)
        if isinstance(request, GetConversation):
            return runtime.conversation(request.loc)
        if isinstance(request, GenerateAssistantReply):
            return GenerationRef(runtime.generate(request.loc, request.options, identity))
        if isinstance(request, CancelGeneration):
            runtime.cancel_generation(request.loc, request.reason)
            return Empty()
        raise BadRequest(f"operation {type(request).__name__} is not supported")

    async def _answer_async(self, identity: bytes, request_id: int, request: Any) -> None:
        runtime = self._runtime
        try:
            if isinstance(request, AwaitGeneration):
                body: Any = await runtime.await_generation(
                    request.loc, request.ref, request.timeout_ms, request.cancel_on_timeout, request.cancel_reason
                )
            else:
                conversation, result = await runtime.send_and_generate(
                    request.loc, request.content, request.message_metadata, request.options, identity,
                    request.timeout_ms, request.cancel_on_timeout, request.cancel_reason,
                )
                body = ConversationAndResult(conversation, result)
        except Exception as exc:  # noqa: BLE001 — every request is answered
            self._fail(identity, request_id, exc)
            return
        self._outbox_send.send_nowait([identity, codec.encode_reply(request_id, body)])

    def _answer(self, identity: bytes, request_id: int, handler) -> None:
        try:
            body = handler()
        except Exception as exc:  # noqa: BLE001 — every request is answered
            self._fail(identity, request_id, exc)
            return
        self._outbox_send.send_nowait([identity, codec.encode_reply(request_id, body)])

    def _fail(self, identity: bytes, request_id: int, exc: Exception) -> None:
        if not isinstance(exc, GenvisorError):
            incident = secrets.token_hex(4)
            log.exception("internal error handling request %d (incident %s)", request_id, incident)
            exc = InternalError(f"internal error (incident {incident}; see the daemon log)")
        self._outbox_send.send_nowait([identity, codec.encode_failure(request_id, exc.info())])

    def _reject(self, identity: bytes, request_id: int, exc: BadRequest) -> None:
        self.frames_rejected += 1
        log.warning("rejected frame from %s: %s", identity.hex(), exc)
        self._outbox_send.send_nowait([identity, codec.encode_failure(request_id, exc.info())])


def resolve_endpoint(config: Config) -> Endpoint:
    return parse_endpoint(config.endpoint) if config.endpoint else default_endpoint()


async def serve(config: Config) -> int:
    endpoint = resolve_endpoint(config)
    if not endpoint.is_loopback:
        raise SystemExit(f"refusing to listen on {endpoint}: only ipc:// and loopback tcp:// endpoints are allowed")
    if endpoint.scheme == "ipc":
        prepare_private_dir(endpoint.path.parent)
        if endpoint.path.exists():
            endpoint.path.unlink()  # a stale socket of a previous daemon (we own the dir)
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.MAXMSGSIZE, HARD_MAX_FRAME_BYTES)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(str(endpoint))
    if endpoint.scheme == "ipc":
        secure_ipc_socket(endpoint)

    pool = WorkerPool(target=WORKER_TARGET, spares=config.workers.spares)
    supervisor = Supervisor(
        pool,
        cancel_grace_s=config.workers.cancel_grace_ms / 1000,
        term_grace_s=config.workers.term_grace_ms / 1000,
    )
    defaults = Defaults(
        backend=config.defaults.backend,
        timeout_ms=config.defaults.timeout_ms,
        stream=config.defaults.stream,
        backends=config.backend_table(),
    )
    try:
        async with TrioSocket.open(router) as sock:
            front: Front | None = None
            runtime = Runtime(
                supervisor=supervisor,
                defaults=defaults,
                deadline_grace_s=config.workers.deadline_grace_ms / 1000,
                retention_s=config.generations.outcome_retention_s,
                notify=lambda owner, note: front.notify(owner, note) if front else None,
            )
            front = Front(sock, runtime, endpoint)
            async with trio.open_nursery() as nursery:
                stop, serving = trio.Event(), trio.Event()
                await nursery.start(_watch_signals, stop, serving, nursery.cancel_scope)
                await nursery.start(supervisor.run)
                await nursery.start(runtime.run)
                nursery.start_soon(front.serve)
                serving.set()
                log.info("genvisor %s serving on %s (pid %d)", __version__, endpoint, os.getpid())
                print(f"genvisor {__version__} listening on {endpoint}", file=sys.stderr, flush=True)
                await stop.wait()
                runtime.shutdown()
                await _drain_and_stop(nursery, supervisor, front)
    finally:
        ctx.term()
        if endpoint.scheme == "ipc":
            try:
                endpoint.path.unlink()
            except FileNotFoundError:
                pass
    log.info("genvisor stopped")
    return 0


async def _watch_signals(stop: trio.Event, serving: trio.Event, scope: trio.CancelScope, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """SIGTERM/SIGINT: a graceful stop; during start-up, abandon the start."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        task_status.started()
        async for signum in signals:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            stop.set()
            if not serving.is_set():
                scope.cancel()


async def _drain_and_stop(nursery: trio.Nursery, supervisor: Supervisor, front: Front) -> None:
    # Runs are canceled; their teardown (grace + kill) is bounded by the worker config.
    while supervisor.active:
        handle = next(iter(supervisor.active.values()))
        await handle.cleaned_up.wait()
    with trio.move_on_after(5):
        await front.flush()  # owners get their GenerationCanceled before we go
    nursery.cancel_scope.cancel()


def main(config: Config) -> int:
    logging.basicConfig(
        level=os.environ.get("GENVISOR_LOG_LEVEL", "INFO").upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    return trio.run(serve, config)
