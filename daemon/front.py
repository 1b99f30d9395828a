"""The front: client frames in, service calls, frames out — whatever carries the bytes.

The ZeroMQ server and the embedded daemon both feed it `(owner, frame bytes)` and
drain its outbox, so a call behaves the same on either, bad input included. Every
frame is answered: one that does not decode gets `BadRequest`, a handler bug gets
`InternalError` with an incident id that is also logged. All replies and
notifications leave through one queue, so a client sees them in production order.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from genvisor import __version__
from genvisor.daemon.admission import Admission
from genvisor.daemon.config import Config
from genvisor.daemon.durable import DurableLog
from genvisor.daemon.generations import Executor
from genvisor.daemon.service import Service
from genvisor.daemon.store import Store
from genvisor.errors import BadRequest, GenvisorError, InternalError, Overloaded
from genvisor.ipc import codec, frames as f
from genvisor.logevent import RateLimit, event
from genvisor.modes.registry import supported_modes
from genvisor.types import DaemonInfo, DaemonStatus, GenerationEvent, Notification

log = logging.getLogger("genvisor.daemon")

Owner = Any
Outgoing = tuple[Owner, bytes, int]  # the frame, and how much of the journal must be durable first


async def open_front(config: Config, executor: Executor, endpoint: str, store: Store) -> Front:
    """The service `config` describes, restored from `store` and running on `executor`,
    behind a front that carries its notifications."""
    retained_since = time.time() - config.generations.outcome_retention_s
    if store.blocking:
        snapshot = await trio.to_thread.run_sync(lambda: store.load(retained_since=retained_since))
    else:
        snapshot = store.load(retained_since=retained_since)
    def notify(owner: Owner, note: Notification, frame: bytes | None = None) -> None:
        front.notify(owner, note, frame)  # the front is made below, before anything runs

    service = Service(
        executor=executor,
        journal=DurableLog(store),
        admission=Admission(max_active=config.admission.max_active, max_queued=config.admission.max_queued),
        defaults=config.run_defaults(),
        deadline_grace_s=config.workers.deadline_grace_ms / 1000,
        retention_s=config.generations.outcome_retention_s,
        workspaces=config.state_path() / "workspaces",
        snapshots=config.state_path() / "snapshots",
        notify=notify,
    )
    resolved = service.restore(snapshot)
    await service.generations.settle_interrupted()
    await service.change_sets.settle_interrupted()
    if snapshot.conversations:
        log.info("journal %s: %d conversations restored, %d interrupted generations resolved as daemon_restarted",
                 store.describe(), len(snapshot.conversations), resolved)
    front = Front(service, endpoint, max_unread_bytes=config.clients.max_unread_bytes)
    return front


# What a connection that reads nothing may cost beyond its budget: the refusals of its
# further requests (≈100 bytes each). Past it, its requests go unanswered until it
# reads — it has stopped reading answers anyway, and nothing it asked for is applied.
REFUSALS_BYTES = 1024 * 1024


class Front:
    def __init__(self, service: Service, endpoint: str, max_unread_bytes: int) -> None:
        self.service = service
        self._service = service
        self._endpoint = endpoint
        self.metrics_address: str | None = None  # set by the server when it serves metrics
        self._started = time.monotonic()
        self._outbox_send, self.outbox = trio.open_memory_channel[Outgoing | trio.Event](math.inf)
        self._journal = service.journal
        # Bytes queued for each connection and not yet handed to its transport. A reply
        # or a terminal notification is never dropped; so that a client that does not
        # read cannot grow this without bound, past the budget its progress events are
        # shed and its new requests refused (Overloaded) until it reads.
        self._max_unread = max_unread_bytes
        self._unread: dict[Owner, int] = {}
        self._shed: dict[tuple[Owner, str], tuple[int, int]] = {}  # (owner, ref) → the seqs shed since its last event
        self._reject_log = RateLimit()
        self._backlog_log = RateLimit()

    # ---- in --------------------------------------------------------------------------

    def receive(self, nursery: trio.Nursery, owner: Owner, data: bytes) -> None:
        """Handle one client frame. Every handler's synchronous part runs before this
        returns, so calls to one conversation take effect in arrival order; a call that
        then waits (an await) answers later, from a task of `nursery`."""
        self._service.telemetry.requests_received.inc()
        try:
            frame = codec.decode_request(data)
        except codec.BadRequestFrame as exc:
            self.reject(owner, exc.request_id, exc)
            return
        if (unread := self._unread.get(owner, 0)) > self._max_unread:
            self._refuse_unread(owner, frame.id, unread)
            return
        try:
            answer = self._handlers[type(frame.req)](self, owner, frame.req)
        except Exception as exc:  # noqa: BLE001 — every request is answered
            self._fail(owner, frame.id, exc)
            return
        if isinstance(answer, Later):
            nursery.start_soon(self._answer_later, owner, frame.id, answer)
        else:
            self._reply(owner, frame.id, answer)

    def reject(self, owner: Owner, request_id: int, exc: BadRequest) -> None:
        self._service.telemetry.frames_rejected.inc()
        if (held := self._reject_log.allow()) is not None:  # a fuzzing client must not flood the log
            event(log, "frame.rejected", logging.WARNING, request_id=request_id, detail=str(exc)[:200], suppressed=held)
        self._put(owner, codec.encode_failure(request_id, exc.info()))

    def _refuse_unread(self, owner: Owner, request_id: int, unread: int) -> None:
        telemetry = self._service.telemetry
        if unread > self._max_unread + REFUSALS_BYTES:
            telemetry.requests_unanswered.inc()
            return
        telemetry.requests_refused_unread.inc()
        if (held := self._backlog_log.allow()) is not None:
            event(log, "connection.backlogged", logging.WARNING, unread_bytes=unread, limit=self._max_unread, suppressed=held)
        refusal = Overloaded(f"this connection has {unread} bytes of answers it has not read (limit {self._max_unread}); "
                             "read them, then retry")
        self._put(owner, codec.encode_failure(request_id, refusal.info()))

    # ---- out -------------------------------------------------------------------------

    def notify(self, owner: Owner, note: Notification, frame: bytes | None = None) -> None:
        """Queue `note` for `owner`; a run's event may come encoded already (`frame`).
        Past the connection's budget a run's progress events are shed, never its
        terminal event or notification; the next event that goes is preceded by a `gap`
        event naming the seqs shed (the reader can fetch them with `stream_events`)."""
        if not isinstance(note, GenerationEvent):
            self._put(owner, codec.encode_notification(note))
            return
        data = codec.encode_notification(note) if frame is None else codec.encode_event_notification(frame)
        key = (owner, note.ref)
        if not note.terminal and self._unread.get(owner, 0) + len(data) > self._max_unread:
            self._service.telemetry.events_shed.inc()
            first = self._shed[key][0] if key in self._shed else note.seq
            self._shed[key] = (first, note.seq)
            return
        if (shed := self._shed.pop(key, None)) is not None:
            gap = GenerationEvent(note.ref, "gap", first_seq=shed[0], last_seq=shed[1])
            self._put(owner, codec.encode_notification(gap))
        self._put(owner, data)

    def _put(self, owner: Owner, data: bytes) -> None:
        self._unread[owner] = self._unread.get(owner, 0) + len(data)
        # Everything the service wrote before this frame was queued must be durable
        # before the frame leaves (group commit: one wait covers many frames).
        self._outbox_send.send_nowait((owner, data, self._journal.submitted))

    def delivered(self, owner: Owner, nbytes: int) -> None:
        """The transport has handed `nbytes` of `owner`'s frames on (or dropped them: the
        connection is gone)."""
        left = self._unread.get(owner, 0) - nbytes
        if left > 0:
            self._unread[owner] = left
        else:
            self._unread.pop(owner, None)

    async def flush(self) -> None:
        """Return once everything queued so far has been handed to the transport."""
        marker = trio.Event()
        self._outbox_send.send_nowait(marker)
        await marker.wait()

    async def pump(self, deliver: Callable[[Owner, bytes], None]) -> None:
        """Drain the outbox into the transport's `deliver` until cancelled; the transport
        calls `delivered` as the bytes leave."""
        async for item in self.outbox:
            if isinstance(item, trio.Event):
                item.set()
                continue
            owner, data, ticket = item
            if ticket > self._journal.durable:
                await self._journal.wait_durable(ticket)
            deliver(owner, data)

    # ---- handlers ----------------------------------------------------------------------

    async def _answer_later(self, owner: Owner, request_id: int, later: Later) -> None:
        try:
            body = await later.wait()
        except Exception as exc:  # noqa: BLE001 — every request is answered
            self._fail(owner, request_id, exc)
            return
        self._reply(owner, request_id, body)

    def _reply(self, owner: Owner, request_id: int, body: Any) -> None:
        try:
            data = codec.encode_reply(request_id, body)
        except Exception as exc:  # noqa: BLE001 — a body that cannot be encoded is still answered
            self._fail(owner, request_id, exc)
            return
        self._put(owner, data)

    def _fail(self, owner: Owner, request_id: int, exc: Exception) -> None:
        if not isinstance(exc, GenvisorError):
            incident = secrets.token_hex(4)
            log.exception("internal error handling request %d (incident %s)", request_id, incident)
            exc = InternalError(f"internal error (incident {incident}; see the daemon log)")
        self._put(owner, codec.encode_failure(request_id, exc.info()))

    def _ping(self, owner: Owner, r: f.Ping) -> DaemonInfo:
        return DaemonInfo(__version__, os.getpid(), time.monotonic() - self._started, self._endpoint)

    def _status(self, owner: Owner, r: f.GetStatus) -> DaemonStatus:
        return self._service.status(self._ping(owner, f.Ping()), self.metrics_address)

    def _ensure(self, owner: Owner, r: f.EnsureConversation) -> f.Ensured:
        return f.Ensured(*self._service.conversations.ensure_conversation(r.id, r.project_id, r.metadata))

    def _cancel(self, owner: Owner, r: f.CancelGeneration) -> f.Empty:
        self._service.generations.cancel_generation(r.loc, r.reason)
        return f.Empty()

    def _stop(self, owner: Owner, r: f.StopConversation) -> f.Empty:
        self._service.conversations.stop_conversation(r.loc)
        return f.Empty()

    def _await(self, owner: Owner, r: f.AwaitGeneration) -> Later:
        record = self._service.generations.find_generation(r.loc, r.ref, r.timeout_ms)
        return Later(lambda: self._service.generations.await_outcome(record, r.timeout_ms, r.cancel_on_timeout, r.cancel_reason))

    def _send_and_generate(self, owner: Owner, r: f.SendAndGenerate) -> Later:
        record = self._service.generations.send_and_generate(r.loc, r.content, r.message_metadata, r.options, owner, r.timeout_ms)

        async def wait() -> f.ConversationAndResult:
            result = await self._service.generations.await_outcome(record, r.timeout_ms, r.cancel_on_timeout, r.cancel_reason)
            return f.ConversationAndResult(self._service.conversations.conversation(r.loc), result)

        return Later(wait)

    def _turn_changes(self, owner: Owner, r: f.TurnChanges) -> Later:
        change_set = self._service.change_sets.find_change_set(r.loc, r.ref)
        return Later(lambda: self._service.change_sets.turn_changes(change_set))

    def _resolve_approval(self, owner: Owner, r: f.ResolveApproval) -> f.Empty:
        self._service.generations.resolve_approval(r.loc, r.ref, r.call_id, r.approve, r.note)
        return f.Empty()

    def _stream_events(self, owner: Owner, r: f.StreamEvents) -> Later:
        record = self._service.generations.find_events(r.loc, r.ref, r.after_seq, r.wait_ms)
        return Later(lambda: self._service.generations.stream_events(record, r.after_seq, r.wait_ms))

    def _revert_turn(self, owner: Owner, r: f.RevertTurn) -> Later:
        change_set = self._service.change_sets.check_revertible(r.loc, r.ref)
        return Later(lambda: self._service.change_sets.revert_turn(change_set, r.reason))

    # Each returns the reply's body, or a `Later` for a call that waits.
    _handlers: dict[type, Callable[[Front, Owner, Any], Any]] = {
        f.Ping: _ping,
        f.StartConversation: lambda self, o, r: self._service.conversations.start_conversation(r.id, r.project_id, r.metadata),
        f.EnsureConversation: _ensure,
        f.SendUserMessage: lambda self, o, r: self._service.conversations.send_user_message(r.loc, r.content, r.metadata),
        f.RecordAssistantMessage: lambda self, o, r: self._service.conversations.record_assistant_message(r.loc, r.content, r.metadata),
        f.ConfigureLLM: lambda self, o, r: self._service.conversations.configure_llm(r.loc, r.backend, r.provider, r.model, r.options),
        f.ConfigureSkills: lambda self, o, r: self._service.conversations.configure_skills(r.loc, r.enabled),
        f.ConfigureMode: lambda self, o, r: self._service.conversations.configure_mode(
            r.loc, r.mode, r.mode_state, reason=r.reason, force=r.force, cancel_reason=r.cancel_reason, cause_id=r.cause_id
        ),
        f.GetConversation: lambda self, o, r: self._service.conversations.conversation(r.loc),
        f.GetDerivedState: lambda self, o, r: self._service.conversations.derived_state(r.loc),
        f.GetMessages: lambda self, o, r: self._service.conversations.conversation_messages(r.loc, r.max_messages, r.roles),
        f.GetLLMContext: lambda self, o, r: self._service.conversations.conversation_llm_context(
            r.loc, r.max_messages, r.include_system, r.include_tool
        ),
        f.GetTimeline: lambda self, o, r: self._service.conversations.conversation_timeline(r.loc),
        f.GetThreadEntries: lambda self, o, r: self._service.conversations.conversation_thread_entries(r.loc),
        f.GetMode: lambda self, o, r: f.ModeId(self._service.conversations.mode(r.loc)),
        f.SupportedModes: lambda self, o, r: supported_modes(),
        f.StopConversation: _stop,
        f.GetTelemetry: lambda self, o, r: self._service.telemetry.snapshot(),
        f.GetStatus: _status,
        f.GenerateAssistantReply: lambda self, o, r: f.GenerationRef(self._service.generations.generate(r.loc, r.options, o)),
        f.CancelGeneration: _cancel,
        f.AwaitGeneration: _await,
        f.SendAndGenerate: _send_and_generate,
        f.TurnChanges: _turn_changes,
        f.GetPlans: lambda self, o, r: self._service.conversations.plans(r.loc),
        f.RevertTurn: _revert_turn,
        f.StreamEvents: _stream_events,
        f.PendingApprovals: lambda self, o, r: self._service.generations.pending_approvals(r.loc),
        f.ResolveApproval: _resolve_approval,
    }


class Later:
    """The answer of a call whose synchronous part is done but whose reply must wait
    (for a run's outcome): `wait()` gives the body."""

    def __init__(self, wait: Callable[[], Awaitable[Any]]) -> None:
        self.wait = wait
