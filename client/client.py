"""The thin synchronous client (CONTRACT §2).

One DEALER socket per `Client`; each call sends one frame and waits for the reply
with its id, queueing the notifications that arrive meanwhile for
`next_notification`. When nothing answers within the timeout the socket is thrown
away (LINGER 0), so a request that never reached a daemon cannot be applied later
by one that starts afterwards.

An await whose `timeout_ms` is None waits as long as the run takes: the client then
gives up only when no daemon answers within its own timeout, or at once when the
connection to the daemon is lost (see dealer.WatchedDealer).
"""

from __future__ import annotations

import collections
import itertools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol, TypeVar

import zmq

from genvisor.client.dealer import WatchedDealer
from genvisor.errors import AwaitTimeout, BadRequest, DaemonUnavailable, InvalidLocator, InvalidOptions
from genvisor.ipc import codec
from genvisor.ipc.curve import client_curve
from genvisor.ipc.endpoint import default_endpoint, parse_endpoint
from genvisor.ipc.frames import (
    MAX_FRAME_BYTES,
    AwaitGeneration,
    CancelGeneration,
    ConfigureLLM,
    ConfigureMode,
    ConfigureSkills,
    ConversationAndResult,
    Empty,
    EnsureConversation,
    Ensured,
    EventBatch,
    Failure,
    GenerateAssistantReply,
    GenerationRef,
    GetConversation,
    GetDerivedState,
    GetLLMContext,
    GetMessages,
    GetMode,
    GetPlans,
    GetStatus,
    GetTelemetry,
    GetThreadEntries,
    GetTimeline,
    ModeId,
    Notify,
    PendingApprovals,
    Ping,
    RecordAssistantMessage,
    ResolveApproval,
    RevertTurn,
    SendAndGenerate,
    SendUserMessage,
    StartConversation,
    StopConversation,
    StreamEvents,
    SupportedModes,
    TurnChanges,
)
from genvisor.limits import AWAIT_CANCEL_REASON, AWAIT_TIMEOUT_MS, CONTEXT_MESSAGES
from genvisor.types import (
    ApprovalRequest,
    ContextMessage,
    Conversation,
    DaemonInfo,
    DaemonStatus,
    DerivedState,
    GenerationEvent,
    JournalEntry,
    LLMResult,
    Locator,
    Message,
    ModeInfo,
    Notification,
    PlanRecord,
    TelemetryCount,
    TimelineEntry,
    WorkspaceChanges,
)

T = TypeVar("T")
DEFAULT_TIMEOUT_MS = 10_000
STREAM_WAIT_MS = 30_000  # how long one `stream_events` request waits for an event

LocatorLike = str | tuple[str, str]


def to_locator(loc: Any) -> Locator:
    """Check a locator's shape here; the daemon checks it again."""
    if isinstance(loc, str) and loc.strip():
        return Locator(None, loc)
    if isinstance(loc, (tuple, list)) and len(loc) == 2 and all(isinstance(p, str) and p.strip() for p in loc):
        return Locator(loc[0], loc[1])
    raise InvalidLocator(f"invalid locator {loc!r}: use 'id' or ('project_id', 'id') with non-blank strings")


def _wait_ms(timeout_ms: Any) -> int | None:
    """How much longer than usual a call may take: None (no fixed limit) for an await
    without a timeout. A wrong type is the daemon's to refuse (BadRequest), so it adds
    nothing here."""
    if timeout_ms is None:
        return None
    return timeout_ms if isinstance(timeout_ms, int) and timeout_ms > 0 else 0


class Transport(Protocol):
    """What the client needs of a socket (a ZeroMQ DEALER, or the embedded runtime's pipe)."""

    def send(self, data: bytes) -> None: ...
    def poll(self, timeout_ms: int, flags: int = zmq.POLLIN) -> int: ...
    def recv(self) -> bytes: ...
    def close(self, linger: int | None = None) -> None: ...


class Client:
    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout_ms: int = DEFAULT_TIMEOUT_MS,
        transport: Callable[[], Transport] | None = None,
        server_key: str | os.PathLike | None = None,
        client_key: str | os.PathLike | None = None,
    ) -> None:
        """`server_key` (the daemon's public certificate) and `client_key` (this
        client's secret certificate) turn CURVE on; they default to
        $GENVISOR_SERVER_KEY and $GENVISOR_CLIENT_KEY. A bad key file raises CurveError."""
        self.endpoint = "embedded" if transport else str(parse_endpoint(endpoint) if endpoint else default_endpoint())
        self._curve = None if transport else client_curve(server_key, client_key)
        self.timeout_ms = timeout_ms
        self._transport = transport
        self._socket: Transport | None = None
        self._ids = itertools.count(1)
        self._notifications: collections.deque[Notification] = collections.deque()

    # ---- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def _connected(self) -> Transport:
        if self._socket is None:
            if self._transport is not None:
                self._socket = self._transport()
            else:
                self._socket = WatchedDealer(self.endpoint, self._curve)
        return self._socket

    def _poll(self, sock: Transport, timeout_ms: int, reply_due: bool = False) -> bool:
        """Wait for a frame. A refused handshake, or (`reply_due`) a connection lost
        since the request went out, raises DaemonUnavailable and drops the socket, as
        a timeout does, so the request cannot go out later."""
        try:
            if reply_due and isinstance(sock, WatchedDealer):
                return bool(sock.poll_reply(timeout_ms))
            return bool(sock.poll(timeout_ms, zmq.POLLIN))
        except DaemonUnavailable:
            self.close()
            raise

    # ---- calls -------------------------------------------------------------------------

    def ping(self) -> DaemonInfo:
        return self._call(Ping(), DaemonInfo)

    # conversations

    def start_conversation(self, id: str, project_id: str | None = None, metadata: dict[str, Any] | None = None) -> Conversation:
        to_locator(id if project_id is None else (project_id, id))
        return self._call(StartConversation(id, project_id, metadata), Conversation)

    def ensure_conversation(self, id: str, project_id: str | None = None, metadata: dict[str, Any] | None = None) -> tuple[Conversation, str]:
        to_locator(id if project_id is None else (project_id, id))
        ensured = self._call(EnsureConversation(id, project_id, metadata), Ensured)
        return ensured.conversation, ensured.status

    def send_user_message(self, loc: LocatorLike, content: str, metadata: dict[str, Any] | None = None) -> Conversation:
        return self._call(SendUserMessage(to_locator(loc), content, metadata), Conversation)

    def record_assistant_message(self, loc: LocatorLike, content: str, metadata: dict[str, Any] | None = None) -> Conversation:
        return self._call(RecordAssistantMessage(to_locator(loc), content, metadata), Conversation)

    def configure_llm(
        self,
        loc: LocatorLike,
        backend: str | None = None,
        *,
        provider: str | None = None,
        model: str | None = None,
        options: dict[str, Any] | None = None,
    ) -> Conversation:
        return self._call(ConfigureLLM(to_locator(loc), backend, provider, model, options), Conversation)

    def configure_skills(self, loc: LocatorLike, enabled: list[str]) -> Conversation:
        return self._call(ConfigureSkills(to_locator(loc), enabled), Conversation)

    def conversation(self, loc: LocatorLike) -> Conversation:
        return self._call(GetConversation(to_locator(loc)), Conversation)

    def derived_state(self, loc: LocatorLike) -> DerivedState:
        return self._call(GetDerivedState(to_locator(loc)), DerivedState)

    def conversation_messages(self, loc: LocatorLike, max_messages: int | None = None, roles: list[str] | None = None) -> list[Message]:
        return self._call(GetMessages(to_locator(loc), max_messages, None if roles is None else list(roles)), list[Message])

    def conversation_llm_context(
        self, loc: LocatorLike, max_messages: int = CONTEXT_MESSAGES, include_system: bool = False, include_tool: bool = False
    ) -> list[ContextMessage]:
        return self._call(GetLLMContext(to_locator(loc), max_messages, include_system, include_tool), list[ContextMessage])

    def conversation_timeline(self, loc: LocatorLike) -> list[TimelineEntry]:
        return self._call(GetTimeline(to_locator(loc)), list[TimelineEntry])

    def conversation_thread_entries(self, loc: LocatorLike) -> list[JournalEntry]:
        return self._call(GetThreadEntries(to_locator(loc)), list[JournalEntry])

    def stop_conversation(self, loc: LocatorLike) -> None:
        self._call(StopConversation(to_locator(loc)), Empty)

    # modes

    def supported_modes(self) -> list[ModeInfo]:
        return self._call(SupportedModes(), list[ModeInfo])

    def mode(self, loc: LocatorLike) -> str:
        return self._call(GetMode(to_locator(loc)), ModeId).mode

    def configure_mode(
        self,
        loc: LocatorLike,
        mode: str,
        mode_state: dict[str, Any] | None = None,
        *,
        reason: str | None = None,
        force: bool = False,
        cancel_reason: str | None = None,
        cause_id: str | None = None,
    ) -> Conversation:
        request = ConfigureMode(to_locator(loc), mode, mode_state, reason, force, cancel_reason, cause_id)
        return self._call(request, Conversation)

    def telemetry(self) -> list[TelemetryCount]:
        """Run counters (one start and one terminal event per run), by closed labels."""
        return self._call(GetTelemetry(), list[TelemetryCount])

    def status(self) -> DaemonStatus:
        """How the daemon is doing: runs, queue, workers, journal, latencies."""
        return self._call(GetStatus(), DaemonStatus)

    # generations

    def generate_assistant_reply(self, loc: LocatorLike, **generation_opts: Any) -> str:
        return self._call(GenerateAssistantReply(to_locator(loc), generation_opts), GenerationRef).ref

    def await_generation(
        self,
        loc: LocatorLike,
        ref: str,
        timeout_ms: int | None = AWAIT_TIMEOUT_MS,
        cancel_on_timeout: bool = True,
        cancel_reason: str = AWAIT_CANCEL_REASON,
        *,
        on_event: Callable[[GenerationEvent], None] | None = None,
    ) -> LLMResult:
        """Wait up to `timeout_ms` for the outcome (None: as long as the run takes; its
        own deadline bounds it). `on_event` gets the run's events while waiting, those
        already queued first: the run must have been started by this client with
        `events=True`."""
        request = AwaitGeneration(to_locator(loc), ref, timeout_ms, cancel_on_timeout, cancel_reason)
        if on_event is not None:
            queued = list(self._notifications)
            self._notifications.clear()
            for note in queued:
                if isinstance(note, GenerationEvent) and note.ref == ref:
                    on_event(note)
                else:
                    self._notifications.append(note)
        return self._call(request, LLMResult, extra_wait_ms=_wait_ms(timeout_ms), on_event=on_event)

    def stream_events(
        self, loc: LocatorLike, ref: str, after_seq: int = 0, timeout_ms: int | None = AWAIT_TIMEOUT_MS
    ) -> Iterator[GenerationEvent]:
        """Iterate generation `ref`'s events after `after_seq`, from any client: those
        kept first, then live ones, until its terminal event (`completed`, `failed` or
        `canceled`), which is always the last one yielded. Works while the run is
        active and for the outcome retention time after it ended, also after a daemon
        restart. `timeout_ms` bounds the whole stream (None: as long as the run takes):
        past it, `AwaitTimeout` (the run goes on). Nothing is shed: a slow reader only
        reads later. `NotFound` for an unknown or expired ref."""
        locator = to_locator(loc)
        if timeout_ms is not None and (not isinstance(timeout_ms, int) or timeout_ms < 0):
            raise InvalidOptions("timeout_ms", "must be an int >= 0, or None")
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        while True:
            left_ms = STREAM_WAIT_MS if deadline is None else int((deadline - time.monotonic()) * 1000)
            wait_ms = max(0, min(STREAM_WAIT_MS, left_ms))
            batch = self._call(StreamEvents(locator, ref, after_seq, wait_ms), EventBatch, extra_wait_ms=wait_ms)
            for event in batch.events:
                yield event
                after_seq = max(after_seq, event.seq)
            if batch.ended:
                return
            if deadline is not None and time.monotonic() >= deadline:
                raise AwaitTimeout(f"the events of generation {ref} did not end within {timeout_ms} ms")

    def pending_approvals(self, loc: LocatorLike) -> list[ApprovalRequest]:
        """The tool calls the conversation's paused run waits for answers to (none: [])."""
        return self._call(PendingApprovals(to_locator(loc)), list[ApprovalRequest])

    def resolve_approval(self, loc: LocatorLike, ref: str, call_id: str, approve: bool = True, note: str | None = None) -> None:
        """Answer the approval of tool call `call_id` of paused run `ref`: approved, it
        runs; denied, the model is told (with `note`). The run goes on, in a fresh worker,
        once all of its calls waiting for an answer have one. `NotFound` if none waits."""
        self._call(ResolveApproval(to_locator(loc), ref, call_id, approve, note), Empty)

    def cancel_generation(self, loc: LocatorLike, reason: str = "cancel_requested") -> None:
        self._call(CancelGeneration(to_locator(loc), reason), Empty)

    def send_and_generate(
        self,
        loc: LocatorLike,
        content: str,
        message_opts: dict[str, Any] | None = None,
        generation_opts: dict[str, Any] | None = None,
        await_opts: dict[str, Any] | None = None,
        on_event: Callable[[GenerationEvent], None] | None = None,
    ) -> tuple[Conversation, LLMResult]:
        await_opts = dict(await_opts or {})
        options = dict(generation_opts or {})
        if on_event is not None:
            options.setdefault("events", True)
        request = SendAndGenerate(
            to_locator(loc),
            content,
            (message_opts or {}).get("metadata"),
            options,
            timeout_ms=await_opts.pop("timeout_ms", AWAIT_TIMEOUT_MS),
            cancel_on_timeout=await_opts.pop("cancel_on_timeout", True),
            cancel_reason=await_opts.pop("cancel_reason", AWAIT_CANCEL_REASON),
        )
        if await_opts:
            raise TypeError(f"unknown await_opts: {', '.join(await_opts)}")
        body = self._call(request, ConversationAndResult, extra_wait_ms=_wait_ms(request.timeout_ms), on_event=on_event)
        return body.conversation, body.result

    # plans (the `planning` mode)

    def plan(self, loc: LocatorLike) -> PlanRecord | None:
        """The latest plan a `planning` turn of the conversation committed; None if none."""
        plans = self.plans(loc)
        return plans[-1] if plans else None

    def plans(self, loc: LocatorLike) -> list[PlanRecord]:
        """Every plan the conversation's `planning` turns committed, oldest first."""
        return self._call(GetPlans(to_locator(loc)), list[PlanRecord])

    # workspace change sets

    def turn_changes(self, loc: LocatorLike, ref: str) -> WorkspaceChanges:
        """What generation `ref` (or a revert's ref) did to the workspace: for a
        completed turn its change set (as `LLMResult.changes`, also after a restart);
        for a run that did not complete, what became of the workspace once it was
        restored. Waits for that restore, if it is still under way."""
        return self._call(TurnChanges(to_locator(loc), ref), WorkspaceChanges, extra_wait_ms=None)

    def revert_turn(self, loc: LocatorLike, ref: str, reason: str | None = None) -> WorkspaceChanges:
        """Put every path turn `ref` changed back as it was before the turn, if each is
        still as the turn left it; otherwise change nothing and raise `RevertConflict`
        (its `paths` say which changed since). Returns the revert's own change set,
        whose `ref` may be reverted in turn. `GenerationInProgress` while a run is active."""
        return self._call(RevertTurn(to_locator(loc), ref, reason), WorkspaceChanges, extra_wait_ms=None)

    def next_notification(self, timeout_ms: int = 0) -> Notification | None:
        """The next notification for this client, waiting up to `timeout_ms`; None if none."""
        if self._notifications:
            return self._notifications.popleft()
        deadline = time.monotonic() + timeout_ms / 1000
        sock = self._connected()
        while True:
            remaining = max(0, int((deadline - time.monotonic()) * 1000))
            if not self._poll(sock, remaining):
                return None
            frame = codec.decode_server_frame(sock.recv())
            if isinstance(frame, Notify):
                return frame.note
            # A reply to a call that gave up waiting: nobody wants it any more.

    # ---- the one round trip ------------------------------------------------------------

    def _call(
        self,
        request: Any,
        result_type: type[T],
        *,
        extra_wait_ms: int | None = 0,
        on_event: Callable[[GenerationEvent], None] | None = None,
    ) -> T:
        """Send `request` and wait for its reply: up to the client's timeout plus
        `extra_wait_ms`; with `extra_wait_ms` None, up to the client's timeout for a
        connection to the daemon and then for as long as it holds."""
        request_id = next(self._ids)
        try:
            data = codec.encode_request(request_id, request)
        except (TypeError, ValueError, OverflowError) as exc:  # a value msgpack cannot carry
            raise BadRequest(f"the request cannot be encoded: {exc}") from None
        if len(data) > MAX_FRAME_BYTES:
            raise BadRequest(f"request of {len(data)} bytes exceeds the {MAX_FRAME_BYTES}-byte frame limit")
        sock = self._connected()
        sock.send(data)
        limit_ms = self.timeout_ms if extra_wait_ms is None else self.timeout_ms + extra_wait_ms
        deadline = time.monotonic() + limit_ms / 1000
        while True:
            remaining = int((deadline - time.monotonic()) * 1000)
            if remaining <= 0 or not self._poll(sock, remaining, reply_due=True):
                if extra_wait_ms is None and (sock.connected if isinstance(sock, WatchedDealer) else True):
                    # No fixed limit, and the daemon is there: wait on (a lost connection
                    # ends the wait at once; the run's own deadline bounds it).
                    deadline = time.monotonic() + self.timeout_ms / 1000
                    continue
                self.close()
                raise DaemonUnavailable(f"no answer from the daemon at {self.endpoint} within {limit_ms} ms")
            frame = codec.decode_server_frame(sock.recv())
            if isinstance(frame, Notify):
                if on_event is not None and isinstance(frame.note, GenerationEvent):
                    on_event(frame.note)
                else:
                    self._notifications.append(frame.note)
                continue
            if frame.id != request_id:
                continue  # the late reply of a call that gave up
            if isinstance(frame, Failure):
                raise frame.error.to_exception()
            return codec.decode_body(frame.body, result_type)
