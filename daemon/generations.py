"""A daemon's generations: each run from its admission to its one outcome, and the
outcomes kept for re-awaits.

A run has exactly one outcome: whichever of commit, failure or cancel settles its
`GenerationRecord` first (`_settle`, the one place that does); the others find it
settled and change nothing. Its slot is held until its processes are gone, and its
workspace is settled (undone, or kept as its change set) before the conversation's
next run starts. Whatever goes wrong inside a run's handling is that run's failure,
never the daemon's.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Protocol

import msgspec
import trio

from genvisor.daemon import approvals
from genvisor.daemon.admission import Admission, Slot
from genvisor.daemon.approvals import Pause
from genvisor.daemon.conversations import ConversationKey, ConversationRecord, Conversations, check_limit, checked_message, key_of
from genvisor.daemon.durable import DurableLog
from genvisor.daemon.run_events import EventStreams, RunEvents
from genvisor.daemon.store import (
    ForgetGenerations,
    GenerationFinished,
    GenerationPaused,
    GenerationResumed,
    GenerationStarted,
    StoredGeneration,
    StoredOutcome,
    StoreFailed,
)
from genvisor.daemon.telemetry import Telemetry
from genvisor.daemon.workspaces import Workspaces, excludes
from genvisor.errors import (
    AwaitTimeout,
    ErrorInfo,
    GenerationCanceled,
    GenerationInProgress,
    InvalidOptions,
    LLMError,
    LLMErrorCategory,
    NoGenerationInProgress,
    NotFound,
    Overloaded,
)
from genvisor.ipc.frames import RawEventBatch
from genvisor.limits import MAX_CHANNEL_FRAME
from genvisor.logevent import RateLimit, event
from genvisor.modes.llm import Decision, RunDefaults, RunPaused, RunSpec, RunSucceeded
from genvisor.modes.protocol import AssemblyRequest, MalformedOutcome, decode_outcome
from genvisor.modes.registry import registry
from genvisor.supervisor.runs import Broken, Canceled, Completed, Crashed, DeadlineExceeded, ExecutorHealth, RunHandle, Unavailable
from genvisor.types import (
    ApprovalRequest,
    GenerationCanceled as CanceledNote,
    GenerationEvent,
    GenerationResult,
    LLMResult,
    Locator,
    Notification,
)

Owner = Hashable


Work = Callable[["ConversationRecord", "ActiveGeneration"], Awaitable[None]]


class Notify(Protocol):
    """Send `note` to `owner`; a run's event comes with its frame, as encoded."""

    def __call__(self, owner: Owner, note: Notification, frame: bytes | None = None) -> None: ...

log = logging.getLogger("genvisor.daemon")

# A run's spec travels to its worker as one channel frame; the Start frame around it
# takes a few bytes, kept well clear of.
MAX_SPEC_BYTES = MAX_CHANNEL_FRAME - 64 * 1024

# How long one `stream_events` call may wait for an event (a client's stream waits
# longer by asking again).
MAX_EVENT_WAIT_MS = 60_000

_encoder = msgspec.msgpack.Encoder()
_event_decoder = msgspec.msgpack.Decoder(GenerationEvent)


class Executor(Protocol):
    """Runs a RunSpec somewhere and reports one outcome on the handle it returns."""

    def start_run(self, spec: bytes, *, on_progress: Callable[[msgspec.Raw], None], deadline: float | None,
                  placement: str | None = None) -> RunHandle:
        """`placement`: the run's workspace (a cluster runs it on the node that holds it)."""

    def health(self) -> ExecutorHealth: ...


class GenerationRecord:
    """A generation's outcome, kept for re-awaits after the run ends."""

    def __init__(self, ref: str, key: ConversationKey, run_id: str) -> None:
        self.ref = ref
        self.key = key
        self.run_id = run_id
        self.done = trio.Event()
        self.result: LLMResult | None = None
        self.error: ErrorInfo | None = None
        self.canceled: str | None = None
        self.finished_at: float | None = None  # wall clock: retention outlives restarts
        self.events: RunEvents | None = None  # while its events are not all journaled

    def outcome(self) -> LLMResult:
        if self.canceled is not None:
            raise GenerationCanceled(self.canceled, self.ref)
        if self.error is not None:
            raise self.error.to_exception()
        assert self.result is not None
        return self.result


class ActiveGeneration:
    def __init__(self, record: GenerationRecord, owner: Owner | None, spec: RunSpec, slot: Slot | None, encoded_spec: bytes) -> None:
        self.record = record
        self.owner = owner  # None: nobody to notify (a run a restarted daemon took back)
        self.spec = spec
        self.encoded_spec = encoded_spec
        self.slot = slot  # None while paused
        self.queue_scope = trio.CancelScope()  # cancelled when the run ends while still queued
        self.handle: RunHandle | None = None
        self.created_at = time.perf_counter()
        self.started_at: float | None = None  # perf_counter, once admitted to a worker
        # The error of a run that changed its workspace: its outcome waits for the
        # workspace to be restored, so that it can say what became of it.
        self.failure: ErrorInfo | None = None
        self.partial = PartialOutput()  # what it streamed: kept if it does not complete
        self.pause: Pause | None = None  # waiting for approvals: no worker, no slot, no task
        self.settled: trio.Event | None = None  # set once its workspace is settled (made when it first runs)
        self.driven = False  # a leg of it is under way (its worker may still be going)
        self.ran_s = 0.0  # how long its workers ran: the deadline does not tick while it is paused

    def run_seconds(self) -> float | None:
        return None if self.started_at is None else time.perf_counter() - self.started_at


class Pending:
    """A generation asked for and not begun: its record (the ref is awaitable), who asked, how."""

    def __init__(self, record: GenerationRecord, owner: Owner, options: dict[str, Any],
                 message: tuple[str, dict[str, Any]] | None = None) -> None:
        self.record = record
        self.owner = owner
        self.options = options
        self.message = message  # a user message to record first (`send_and_generate`), checked


MULTITASK = ("reject", "enqueue", "interrupt")  # what a generation does when one is active on its conversation
MAX_ENQUEUED = 16  # generations queued on one conversation


def _multitask(options: dict[str, Any]) -> str:
    """The call's `multitask` option, checked now: it decides what the call does."""
    value = options.get("multitask", "reject")
    if value not in MULTITASK:
        raise InvalidOptions("multitask", f"must be one of {', '.join(MULTITASK)} (got {value!r})")
    return str(value)


PARTIAL_TEXT_LIMIT = 64 * 1024  # characters of a run's streamed text kept when it does not complete
PARTIAL_TOOLS_LIMIT = 256


class PartialOutput:
    """What a run streamed before its end: its text (deltas, bounded) and its tool trace."""

    def __init__(self) -> None:
        self._text: list[str] = []
        self._size = 0
        self.truncated = False
        self.tools: list[dict[str, Any]] = []

    def add(self, event: GenerationEvent) -> None:
        if event.kind == "delta" and event.text:
            room = PARTIAL_TEXT_LIMIT - self._size
            self.truncated = self.truncated or len(event.text) > room
            if room > 0:
                self._text.append(event.text[:room])
                self._size += min(len(event.text), room)
        elif event.kind == "tool_result" and event.tool_result is not None and len(self.tools) < PARTIAL_TOOLS_LIMIT:
            result = event.tool_result
            self.tools.append({"call_id": result.call_id, "name": result.name, "is_error": result.is_error})

    @property
    def text(self) -> str:
        return "".join(self._text)

    def __bool__(self) -> bool:
        return bool(self._text or self.tools)


class Generations:
    def __init__(
        self, *, executor: Executor, journal: DurableLog, conversations: Conversations, workspaces: Workspaces,
        admission: Admission, defaults: RunDefaults, deadline_grace_s: float, retention_s: float, notify: Notify,
        telemetry: Telemetry,
    ) -> None:
        self.streams = EventStreams(journal)
        self._executor = executor
        self._journal = journal
        self._conversations = conversations
        self._workspaces = workspaces
        self.admission = admission
        self._defaults = defaults
        self._deadline_grace_s = deadline_grace_s
        self._retention_s = retention_s
        self._notify = notify
        self.telemetry = telemetry
        self._generations: dict[str, GenerationRecord] = {}
        self._nursery: trio.Nursery | None = None
        self._admitting = True
        self._admission_log = RateLimit()
        self._driving = 0  # runs not yet settled to the end (their workspaces included)
        self._drained = trio.Event()
        self._interrupted: list[tuple[ConversationRecord, GenerationRecord]] = []  # by `restore`: workspaces to undo
        self._paused_at_start: list[tuple[ConversationRecord, ActiveGeneration]] = []  # by `restore`: runs to wait on
        self._approval_deadlines: dict[str, tuple[float, ConversationRecord, ActiveGeneration]] = {}  # ref → when it times out
        self._clock_changed = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._expire_outcomes)
            await nursery.start(self.streams.run)
            nursery.start_soon(self._approval_clock)
            for conversation, active in self._paused_at_start:
                self._wait_for_answers(conversation, active)
            self._paused_at_start.clear()
            task_status.started()
            await trio.sleep_forever()

    def restore(self, stored: list[StoredGeneration]) -> int:
        """Take back the generations the store holds; call once, before serving. A
        generation that was in flight when the daemon died is resolved here, once, as
        failed with reason `daemon_restarted`: its turn never committed (a commit is one
        transaction), so nothing is duplicated. Returns how many were resolved."""
        resolved = 0
        for stored_generation in stored:
            record = GenerationRecord(stored_generation.ref, stored_generation.key, stored_generation.run_id)
            self._generations[record.ref] = record
            if stored_generation.outcome is None and stored_generation.pause is not None:
                record.events = self.streams.open(record.ref, stored_generation.last_seq)
                self._take_back_paused(record, stored_generation.pause)
            elif stored_generation.outcome is None:
                record.events = self.streams.open(record.ref, stored_generation.last_seq)
                error = LLMError(
                    "unknown", "the daemon restarted while the generation was running; nothing of it was committed",
                    retryable=True, details={"reason": "daemon_restarted"},
                )
                conversation = self._conversations.of(record.key)
                self._conversations.append(conversation, kind="note", event="run_finished",
                                           data={"run_id": record.run_id, "status": "failed", "reason": "daemon_restarted"})
                record.error = error.info()
                store = self._workspaces.store(self._workspaces.directory(conversation.key, conversation.metadata))
                if store is not None and self._workspaces.may_have_snapshot(store, record.run_id):
                    self._interrupted.append((conversation, record))  # closed once its workspace is undone
                else:
                    record.error = self._workspaces.said(record.error, "unchanged", [])
                    self._close_record(record)
                resolved += 1
            else:
                outcome = stored_generation.outcome
                record.result, record.error, record.canceled = outcome.result, outcome.error, outcome.canceled
                record.finished_at = stored_generation.finished_at
                record.done.set()
        return resolved

    def _take_back_paused(self, record: GenerationRecord, stored: bytes) -> None:
        """A run that waited for approvals when the daemon stopped waits on: it holds no
        process, so nothing of it was lost. Its owner's connection is gone: nobody is
        notified, its outcome is awaitable by ref."""
        pause, spec, ran_s = approvals.decode(stored)
        conversation = self._conversations.of(record.key)
        active = ActiveGeneration(record, None, spec, None, b"")
        active.pause, active.ran_s = pause, ran_s
        active.settled = conversation.workspace_settled = trio.Event()  # its workspace may hold its changes
        conversation.active = active
        self._paused_at_start.append((conversation, active))

    async def settle_interrupted(self) -> None:
        """Undo what the runs a killed daemon left unfinished did to their workspaces
        (call after `restore`, before serving): they were resolved as failed, and their
        snapshots, taken before their first change, are still there."""
        interrupted, self._interrupted = self._interrupted, []
        for conversation, record in interrupted:
            workspace = self._workspaces.directory(conversation.key, conversation.metadata)
            store = self._workspaces.store(workspace)
            assert store is not None
            settled = await self._workspaces.settle(store, workspace, record.run_id, completed=False)
            result, paths = settled or ("unchanged", [])
            self._record_workspace(conversation, record.run_id, result, paths)
            assert record.error is not None
            record.error = self._workspaces.said(record.error, result, paths)
            self._close_record(record)

    async def drained(self) -> None:
        """Return once no run is left: each one's processes gone, its workspace settled
        and journaled (call after `shutdown`)."""
        while self._driving:
            await self._drained.wait()

    def shutdown(self) -> None:
        """Stop admitting and cancel every queued and running run with reason
        "daemon_shutdown". A paused run holds no process: it stays paused, journaled,
        for the next daemon to take back (its waiting task just ends)."""
        self._admitting = False
        for conversation in self._conversations:
            active = conversation.active
            if active is not None and active.pause is not None:
                while conversation.queue:
                    self._settle_queued(conversation, conversation.queue.popleft(), reason="daemon_shutdown")
            else:
                self.cancel_all(conversation, "daemon_shutdown")

    # ---- generations -------------------------------------------------------------------

    def generate(self, loc: Locator, options: dict[str, Any], owner: Owner) -> str:
        """Start a generation of `loc` (or queue it: `multitask`) and return its ref."""
        key = key_of(loc)
        conversation = self._conversations.get(key)
        multitask = _multitask(options)
        if not self._admitting:
            raise GenerationCanceled("daemon_shutdown")
        busy = conversation is not None and conversation.active is not None
        if busy and multitask == "reject":
            raise GenerationInProgress(f"conversation {key[1]!r} has an active generation")
        if busy and multitask == "enqueue":
            assert conversation is not None
            return self._enqueue(conversation, options, owner)
        slot = self._admit()
        if busy:  # "interrupt": the active run ends first (its workspace settles before the new one starts)
            assert conversation is not None
            self.cancel(conversation, "interrupted", start_next=False)
        conversation = conversation or self._conversations.create(key, {})
        record = self._new_record(key)
        self._begin(conversation, Pending(record, owner, options), slot)
        return record.ref

    def _new_record(self, key: ConversationKey) -> GenerationRecord:
        record = GenerationRecord("gen_" + secrets.token_urlsafe(18), key, "run_" + secrets.token_hex(8))
        record.events = self.streams.open(record.ref)
        self._generations[record.ref] = record
        self._journal.submit(GenerationStarted(record.ref, key, record.run_id))
        return record

    def _enqueue(self, conversation: ConversationRecord, options: dict[str, Any], owner: Owner,
                 message: tuple[str, dict[str, Any]] | None = None) -> str:
        """Queue a generation to start once those before it on the conversation have
        ended (its context is assembled then: it sees their replies)."""
        if len(conversation.queue) >= MAX_ENQUEUED:
            raise Overloaded(f"conversation {conversation.key[1]!r} has {len(conversation.queue)} generations queued "
                             f"(the limit); await them, then retry")
        self._admit().release()  # a full daemon refuses it now, not when its turn comes
        pending = Pending(self._new_record(conversation.key), owner, options, message)
        conversation.queue.append(pending)
        self._conversations.append(conversation, kind="note", event="run_queued",
                                   data={"ref": pending.record.ref, "position": len(conversation.queue)})
        return pending.record.ref

    def _start_next(self, conversation: ConversationRecord) -> None:
        """The conversation's active run has ended: start the first queued one, if any."""
        if conversation.active is not None or not conversation.queue:
            return
        pending = conversation.queue.popleft()
        try:
            slot = self._admit()
        except Overloaded as exc:
            self._settle_queued(conversation, pending, error=exc.info())
            self._start_next(conversation)
            return
        self._begin(conversation, pending, slot)

    def _begin(self, conversation: ConversationRecord, pending: Pending, slot: Slot) -> None:
        """Assemble the run's spec from the conversation as it is now, make it the
        conversation's active run and drive it."""
        record = pending.record
        if pending.message is not None:
            content, metadata = pending.message
            self._conversations.append(conversation, kind="message", role="user", content=content, data=metadata)
        spec = self._assemble(AssemblyRequest(
            ref=record.ref, run_id=record.run_id, conversation_id=conversation.key[1], state=conversation.state,
            options=pending.options, defaults=self._defaults,
            workspace=self._workspaces.directory(conversation.key, conversation.metadata),
        ))
        if spec.workspace is not None and self._workspaces.transactional:
            spec = msgspec.structs.replace(spec, snapshot_store=self._workspaces.store(spec.workspace),
                                           snapshot_excludes=excludes(conversation.metadata))
        encoded = _encoder.encode(spec)
        if spec.request is not None and len(encoded) > MAX_SPEC_BYTES:
            error = LLMError("config", f"the run's context is {len(encoded)} bytes, over the {MAX_SPEC_BYTES}-byte limit of a run: "
                                       "lower max_messages or start a new conversation",
                             details={"reason": "context_too_large", "bytes": len(encoded), "limit": MAX_SPEC_BYTES})
            spec = msgspec.structs.replace(spec, request=None, error=error.info())
        active = ActiveGeneration(record, pending.owner, spec, slot, encoded)
        conversation.active = active
        self._conversations.append(conversation, kind="note", event="run_started",
                                   data={"run_id": record.run_id, "mode": spec.mode, "ref": record.ref})
        self.telemetry.run_started(spec.mode, _backend_label(spec))
        event(log, "run.started", **_run_fields(conversation, active))
        if spec.request is None:
            assert spec.error is not None
            slot.release()
            self._finish_failed(conversation, active, spec.error)
            self._log_run_end(conversation, active)
            return
        self._spawn(conversation, active, self._run_generation)

    def _settle_queued(self, conversation: ConversationRecord, pending: Pending, *, reason: str | None = None,
                       error: ErrorInfo | None = None) -> None:
        """End a queued generation that never started: canceled with `reason`, or failed
        with `error`. It counts as a run that started and ended at once."""
        record = pending.record
        record.canceled, record.error = reason, error
        mode = conversation.state.mode
        self.telemetry.run_started(mode, "unknown")
        self.telemetry.run_finished(mode, "unknown", "canceled" if reason else "failed",
                                    "canceled" if reason else (error.category if isinstance(error, ErrorInfo) else None), None)
        self._conversations.append(conversation, kind="note", event="queued_run_ended",
                                   data={"ref": record.ref, "status": "canceled" if reason else "failed", "reason": reason})
        terminal, frame = self._close_record(record)
        if pending.options.get("events") is True:
            self._notify(pending.owner, terminal, frame)
        note: Notification = CanceledNote(ref=record.ref, reason=reason) if reason else GenerationResult(ref=record.ref, error=error)
        self._notify(pending.owner, note)

    @staticmethod
    def _assemble(request: AssemblyRequest) -> RunSpec:
        """Step 1, the mode's: the run's spec from the conversation and the call. A mode
        that cannot, or breaks doing it, gives a spec whose run fails with why."""
        mode = registry().get(request.state.mode)
        base: dict[str, Any] = dict(ref=request.ref, run_id=request.run_id, conversation_id=request.conversation_id, mode=request.state.mode,
                    request_id=request.run_id, request=None, workspace=request.workspace)
        if mode is None:
            return RunSpec(**base, error=LLMError("config", f"mode {request.state.mode!r} is not registered here").info())
        try:
            return mode.assemble(request)
        except Exception as exc:  # noqa: BLE001 — a plug-in's bug fails its runs, not the daemon
            log.exception("mode %r failed to assemble run %s", request.state.mode, request.run_id)
            return RunSpec(**base, error=LLMError("unknown", f"mode {request.state.mode!r} could not assemble the run: {exc}",
                                                  retryable=False, details={"reason": "assemble_error"}).info())

    def find_generation(self, loc: Locator, ref: str, timeout_ms: int | None) -> GenerationRecord:
        """The synchronous half of an await: the generation `ref` names, checked."""
        key = key_of(loc)
        record = self._generations.get(ref)
        if record is None or record.key != key:
            raise NotFound(f"no generation {ref!r} for this conversation (unknown or expired)")
        check_limit("timeout_ms", timeout_ms)
        return record

    async def await_outcome(self, record: GenerationRecord, timeout_ms: int | None, cancel_on_timeout: bool, cancel_reason: str) -> LLMResult:
        """Wait for `record`'s outcome; `timeout_ms` None waits as long as the run takes."""
        with trio.move_on_after(math.inf if timeout_ms is None else timeout_ms / 1000):
            await record.done.wait()
        if not record.done.is_set():
            conversation = self._conversations.of(record.key)
            # Ref-checked: a timeout never cancels a newer generation of the conversation.
            if cancel_on_timeout and conversation.active is not None and conversation.active.record is record:
                self.cancel(conversation, cancel_reason)
            elif cancel_on_timeout and (queued := next((p for p in conversation.queue if p.record is record), None)):
                conversation.queue.remove(queued)
                self._settle_queued(conversation, queued, reason=cancel_reason)
            raise AwaitTimeout(f"generation {record.ref} did not finish within {timeout_ms} ms")
        return record.outcome()

    def find_events(self, loc: Locator, ref: str, after_seq: int, wait_ms: int) -> GenerationRecord:
        """The synchronous half of `stream_events`: the generation, and the call, checked."""
        check_limit("after_seq", after_seq)
        check_limit("wait_ms", wait_ms)
        if wait_ms > MAX_EVENT_WAIT_MS:
            raise InvalidOptions("wait_ms", f"must be <= {MAX_EVENT_WAIT_MS}")
        return self.find_generation(loc, ref, None)

    async def stream_events(self, record: GenerationRecord, after_seq: int, wait_ms: int) -> RawEventBatch:
        """Run `record`'s events after `after_seq`, waiting up to `wait_ms` for one."""
        return await self.streams.read(record.ref, after_seq, wait_ms / 1000)

    async def await_generation(self, loc: Locator, ref: str, timeout_ms: int | None, cancel_on_timeout: bool, cancel_reason: str) -> LLMResult:
        return await self.await_outcome(self.find_generation(loc, ref, timeout_ms), timeout_ms, cancel_on_timeout, cancel_reason)

    def cancel_generation(self, loc: Locator, reason: str) -> None:
        conversation = self._conversations.fetch(loc)
        if conversation.active is None:
            raise NoGenerationInProgress(f"conversation {conversation.key[1]!r} has no active generation")
        self.cancel(conversation, reason)

    def send_and_generate(
        self, loc: Locator, content: str, message_metadata: Any, options: dict[str, Any], owner: Owner, timeout_ms: int | None
    ) -> GenerationRecord:
        """The synchronous half of send → generate → await: the message is recorded and
        the run started (or nothing is done) before the next command is looked at."""
        check_limit("timeout_ms", timeout_ms)
        multitask = _multitask(options)
        conversation = self._conversations.get(key_of(loc))
        if conversation is not None and conversation.active is not None and multitask == "enqueue":
            # The message is the queued turn's: recorded when its turn comes, before its context is assembled.
            message = (content, checked_message(content, message_metadata))
            return self._generations[self._enqueue(conversation, options, owner, message)]
        self._admit().release()  # full: refused before the user message is recorded
        if conversation is not None and conversation.active is not None and multitask == "interrupt":
            checked_message(content, message_metadata)  # a bad message interrupts nothing
            self.cancel(conversation, "interrupted", start_next=False)
        self._conversations.send_user_message(loc, content, message_metadata)
        return self._generations[self.generate(loc, options, owner)]

    # ---- run lifecycle -----------------------------------------------------------------

    def _admit(self) -> Slot:
        try:
            return self.admission.admit()
        except Overloaded:
            self.telemetry.admissions_rejected.inc()
            if (held := self._admission_log.allow()) is not None:
                event(log, "admission.rejected", logging.WARNING, active=self.admission.active, queued=self.admission.queued,
                      suppressed=held)
            raise  # nothing has been recorded

    def _on_progress(self, conversation: ConversationRecord, active: ActiveGeneration, raw: msgspec.Raw) -> None:
        if active.record.done.is_set():
            return
        try:
            progress = _event_decoder.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # a worker's frame is hostile too
            self._fail_run(conversation, active, "unknown", f"the worker sent a malformed progress event: {exc}", "protocol_error")
            return
        events = active.record.events
        assert events is not None
        if progress.ref != active.record.ref or progress.seq != events.last_seq + 1 or progress.terminal or progress.kind == "gap":
            self._fail_run(conversation, active, "unknown", f"the worker sent an event out of turn: {progress.kind} #{progress.seq} "
                           f"of {progress.ref!r} (expected #{events.last_seq + 1} of {active.record.ref!r})", "protocol_error")
            return
        frame = bytes(raw)
        events.append(frame)
        active.partial.add(progress)
        if active.spec.events and active.owner is not None:
            self._notify(active.owner, progress, frame)

    def _spawn(self, conversation: ConversationRecord, active: ActiveGeneration, work: Work) -> None:
        assert self._nursery is not None
        self._driving += 1
        self._nursery.start_soon(self._drive, conversation, active, work)

    async def _drive(self, conversation: ConversationRecord, active: ActiveGeneration, work: Work) -> None:
        """Do `work` for a run: drive it (to its end, or its pause), or conclude it.
        Whatever goes wrong in here is this run's failure, never the daemon's: the run
        ends with a typed error and its worker is torn down; only a journal failure (the
        crash-only stop) goes further."""
        try:
            await work(conversation, active)
        except StoreFailed:
            raise
        except Exception:  # noqa: BLE001 — contained to the run it belongs to
            incident = secrets.token_hex(4)
            log.exception("run %s failed inside the daemon (incident %s)", active.record.run_id, incident)
            self._fail_run(conversation, active, "unknown", f"internal error (incident {incident}; see the daemon log)", "internal_error",
                           at_once=True)
            if active.handle is not None:
                with trio.CancelScope(shield=True):
                    await active.handle.cleaned_up.wait()
            if active.settled is not None:
                active.settled.set()  # its workspace stays as it is (said in its outcome): the next run may start
        finally:
            if active.pause is None or active.record.done.is_set():  # it ended (a pause is no end)
                self._log_run_end(conversation, active)
            self._driving -= 1  # counted from `generate`, so that a run not yet begun counts too
            if not self._driving:
                self._drained.set()
                self._drained = trio.Event()

    def _log_run_end(self, conversation: ConversationRecord, active: ActiveGeneration) -> None:
        """One line per run, once its processes are gone: how it ended and how it was cleaned up."""
        record, handle = active.record, active.handle
        fields: dict[str, Any] = _run_fields(conversation, active)
        level = logging.INFO
        if record.canceled is not None:
            fields.update(outcome="canceled", reason=record.canceled)
        elif record.error is not None:
            fields.update(outcome="failed", category=record.error.category, error=record.error.message[:200])
            reason = (record.error.details or {}).get("reason")
            if isinstance(reason, str):
                fields["reason"] = reason
        else:
            fields["outcome"] = "completed"
        fields["duration_ms"] = round((time.perf_counter() - active.created_at) * 1000, 1)
        if active.started_at is not None and active.slot is not None:
            fields["queue_ms"] = round(active.slot.waited_s * 1000, 1)
        report = handle.cleanup if handle is not None else None
        if report is not None:
            fields.update(pid=report.pid, ended_by=report.ended_by, cleanup="verified" if report.verified else "survivors",
                          leftovers_killed=len(report.leftovers_killed), reaped_ms=round(report.reaped_after_ms, 1))
            if report.node is not None:
                fields["node"] = report.node
            if not report.verified:
                level = logging.ERROR
        else:
            fields["cleanup"] = "none"  # no process ran (in-process, or it never started)
        event(log, "run.finished", level, **fields)

    async def _run_generation(self, conversation: ConversationRecord, active: ActiveGeneration) -> None:
        """Wait for admission, run the run in a worker, settle. A slot is held until its
        worker is gone, so `max_active` bounds processes, not just runs. A run that
        paused for approvals just returns: it holds no task, no slot and no worker until
        its answers come (then this runs again, a leg of the same run) or it ends."""
        first_leg = active.settled is None
        active.driven = True
        assert active.slot is not None
        with active.slot:
            with active.queue_scope:
                await active.slot.acquire()
                if first_leg:
                    await conversation.workspace_settled.wait()  # the run before may still be undoing its changes
            if active.record.done.is_set():
                if first_leg:
                    return  # canceled while queued: nothing of it ran
            else:
                if first_leg:
                    self.telemetry.queue_wait_seconds.observe(active.slot.waited_s)
                    active.settled = conversation.workspace_settled = trio.Event()
                    active.started_at = time.perf_counter()
                await self._run_leg(conversation, active)
        active.driven = False
        if active.pause is not None and not active.record.done.is_set():
            self._wait_for_answers(conversation, active)  # only now: its worker is gone
            return
        await self._conclude(conversation, active)

    async def _conclude(self, conversation: ConversationRecord, active: ActiveGeneration) -> None:
        """The run has ended and its processes are gone: settle its workspace, give it
        the outcome that waited for that, and let the conversation's next run start."""
        assert active.settled is not None
        try:
            with trio.CancelScope(shield=True):  # a shutdown still undoes what its runs did
                result, paths = await self._settle_workspace(conversation, active)
            if active.failure is not None and not active.record.done.is_set():
                self._finish(conversation, active, error=self._workspaces.said(active.failure, result, paths))
        finally:
            active.settled.set()

    async def _run_leg(self, conversation: ConversationRecord, active: ActiveGeneration) -> None:
        """Run the run in a worker until it ends or pauses, and its worker is gone."""
        assert active.spec.request is not None
        began = trio.current_time()
        deadline = began + active.spec.request.timeout_ms / 1000 - active.ran_s + self._deadline_grace_s
        active.handle = self._executor.start_run(
            active.encoded_spec, on_progress=lambda raw: self._on_progress(conversation, active, raw), deadline=deadline,
            placement=active.spec.workspace,
        )
        await self._settle_when_done(conversation, active)
        await active.handle.cleaned_up.wait()
        self._observe_cleanup(active.handle)
        active.ran_s += trio.current_time() - began
        if active.pause is not None:
            active.handle = None

    def _pause(self, conversation: ConversationRecord, active: ActiveGeneration, paused: RunPaused) -> None:
        """The run waits for approvals: journaled (its answers are taken after a restart
        too), its owner told, its worker let go."""
        pause = active.pause = Pause.of(paused)
        # What a paused run keeps is its memory cost: the spec is made again, with what
        # the run was fed, when it goes on; its last worker's handle goes (once it is reaped).
        active.encoded_spec = b""
        self._journal.submit(GenerationPaused(active.record.ref, pause.encode(active.spec, active.ran_s)))
        requests = pause.requests(active.record.ref)
        self._conversations.append(conversation, kind="note", event="approval_requested", data={
            "run_id": active.record.run_id, "ref": active.record.ref,
            "calls": [{"call_id": r.call_id, "tool": r.tool, "arguments": r.arguments} for r in requests]})
        for request in requests:  # pushed to the owner whether it asked for events or not: it must answer
            self._emit(active, GenerationEvent(active.record.ref, "approval_requested", tool_call=pause.call(request.call_id)),
                       always=True)
        event(log, "run.paused", **_run_fields(conversation, active), approvals=len(requests))

    def _wait_for_answers(self, conversation: ConversationRecord, active: ActiveGeneration) -> None:
        """A paused run waits: for its answers (then it goes on), its approval timeout
        (the approval clock's), or its end. Answered already (before a restart): it goes on."""
        pause = active.pause
        assert pause is not None
        if pause.answered and not active.driven:  # else its leg, ending, goes on with it
            self._resume(conversation, active)
            return
        timeout_ms = active.spec.approval_timeout_ms
        if timeout_ms is not None:
            self._approval_deadlines[active.record.ref] = (pause.requested_at + timeout_ms / 1000, conversation, active)
            self._clock_changed.set()

    async def _approval_clock(self) -> None:
        """Fail the paused runs whose approval timeout has passed (reason approval_timeout)."""
        while True:
            now = time.time()
            for ref, (deadline, conversation, active) in list(self._approval_deadlines.items()):
                if deadline <= now:
                    del self._approval_deadlines[ref]
                    if active.pause is not None and not active.record.done.is_set():
                        self._approval_timed_out(conversation, active)
            earliest = min((deadline for deadline, _, _ in self._approval_deadlines.values()), default=math.inf)
            with trio.move_on_after(max(0.0, earliest - now)):
                await self._clock_changed.wait()
            self._clock_changed = trio.Event()

    def _approval_timed_out(self, conversation: ConversationRecord, active: ActiveGeneration) -> None:
        assert active.pause is not None
        waiting = len(active.pause.requests(active.record.ref))
        self._finish_failed(conversation, active, LLMError(
            "timeout", f"no answer to the approval of {waiting} tool call(s) within {active.spec.approval_timeout_ms} ms",
            retryable=False, details={"reason": "approval_timeout"}).info())
        active.pause = None  # it ends: what remains is to settle it
        self._spawn(conversation, active, self._conclude)

    def _resume(self, conversation: ConversationRecord, active: ActiveGeneration) -> None:
        """Every approval is answered: the run goes on, in a fresh worker, from where it paused."""
        pause = active.pause
        assert pause is not None and active.record.events is not None
        active.spec = msgspec.structs.replace(active.spec, resume=pause.resume(active.record.events.last_seq + 1))
        active.encoded_spec = _encoder.encode(active.spec)
        active.pause, active.handle = None, None
        active.queue_scope = trio.CancelScope()
        active.slot = self.admission.admit(beyond_queue=True)  # admitted once already: not refused now
        self._approval_deadlines.pop(active.record.ref, None)
        self._journal.submit(GenerationResumed(active.record.ref))
        self._conversations.append(conversation, kind="note", event="run_resumed", data={"run_id": active.record.run_id})
        self._spawn(conversation, active, self._run_generation)

    def pending_approvals(self, loc: Locator) -> list[ApprovalRequest]:
        active = self._conversations.fetch(loc).active
        if active is None or active.pause is None:
            return []
        return active.pause.requests(active.record.ref)

    def resolve_approval(self, loc: Locator, ref: str, call_id: str, approve: bool, note: str | None) -> None:
        """Answer the approval of tool call `call_id` of paused run `ref`; the run goes
        on once all of its calls waiting for one are answered."""
        conversation = self._conversations.fetch(loc)
        active = conversation.active
        pause = active.pause if active is not None and active.record.ref == ref else None
        call = pause.call(call_id) if pause is not None else None
        if active is None or pause is None or call is None:
            raise NotFound(f"no approval of call {call_id!r} of generation {ref!r} is pending in this conversation")
        pause.decisions[call_id] = Decision(approve, note)
        self._journal.submit(GenerationPaused(ref, pause.encode(active.spec, active.ran_s)))
        self._conversations.append(conversation, kind="note", event="approval_resolved", data={
            "run_id": active.record.run_id, "ref": ref, "call_id": call_id, "tool": call.name, "approve": approve, "note": note})
        self._emit(active, GenerationEvent(ref, "approval_resolved", tool_call=call, reason="approved" if approve else "denied",
                                           text=note))
        if pause.answered and not active.driven:  # else its leg, ending (its worker still exiting), goes on with it
            self._resume(conversation, active)

    def _emit(self, active: ActiveGeneration, event: GenerationEvent, *, always: bool = False) -> None:
        """Append an event of the daemon's to the run's (numbered next); push it to the
        owner if it asked for events, or `always`."""
        events = active.record.events
        assert events is not None
        event = msgspec.structs.replace(event, seq=events.last_seq + 1)
        frame = _encoder.encode(event)
        events.append(frame)
        if (always or active.spec.events) and active.owner is not None:
            self._notify(active.owner, event, frame)

    async def _settle_workspace(self, conversation: ConversationRecord, active: ActiveGeneration) -> tuple[str, list[str]]:
        """Once the run's processes are gone (nothing writes any more): undo its changes
        to the workspace unless it completed (else keep them as its change set), and
        journal what became of it."""
        spec = active.spec
        if not self._workspaces.changed(spec):
            return "unchanged", []  # no snapshot was needed
        assert spec.snapshot_store is not None and spec.workspace is not None
        settled = await self._workspaces.settle(spec.snapshot_store, spec.workspace, spec.run_id,
                                                completed=active.record.result is not None)
        if settled is None:
            return "unchanged", []
        self._record_workspace(conversation, spec.run_id, *settled)
        return settled

    def _record_workspace(self, conversation: ConversationRecord, run_id: str, result: str, paths: list[str]) -> None:
        self._conversations.append(conversation, kind="note", event="workspace_restored",
                                   data={"run_id": run_id, "workspace": result, "paths": paths[:100], "paths_total": len(paths)})
        self.telemetry.workspace_restores.labels(result).inc()
        event(log, "workspace.settled", logging.ERROR if result == "restore_failed" else logging.INFO, run_id=run_id,
              conversation=conversation.key[1], workspace=result, paths=len(paths))

    async def _settle_when_done(self, conversation: ConversationRecord, active: ActiveGeneration) -> None:
        assert active.handle is not None
        outcome = await active.handle.wait()
        if active.record.done.is_set():
            return  # canceled first: the run's result, if any, is dropped
        if isinstance(outcome, Completed):
            try:
                run_outcome = decode_outcome(outcome.outcome)
            except MalformedOutcome as exc:
                self._fail_run(conversation, active, "unknown", f"the worker sent a malformed result: {exc}", "protocol_error")
                return
            if isinstance(run_outcome, RunSucceeded):
                self._finish(conversation, active, success=run_outcome)
            elif isinstance(run_outcome, RunPaused):
                self._pause(conversation, active, run_outcome)
            else:
                self._finish_failed(conversation, active, run_outcome.error)
        elif isinstance(outcome, Crashed):
            event(log, "worker.crashed", logging.WARNING, ref=active.record.ref, run_id=active.record.run_id, **outcome.details)
            lost = outcome.details.get("reason") == "node_lost"
            message = f"the cluster node running the generation was lost ({outcome.details.get('lost')})" if lost else "generation worker crashed"
            self._finish_failed(conversation, active, LLMError("unknown", message, details=outcome.details).info())
        elif isinstance(outcome, Broken):
            self._fail_run(conversation, active, "unknown", f"the worker broke the run protocol: {outcome.message}", "protocol_error")
        elif isinstance(outcome, DeadlineExceeded):
            assert active.spec.request is not None
            message = f"generation deadline passed ({active.spec.request.timeout_ms} ms + {self._deadline_grace_s * 1000:.0f} ms grace)"
            self._finish_failed(conversation, active, LLMError("timeout", message).info())
        elif isinstance(outcome, Unavailable):
            self._finish_failed(conversation, active, LLMError(outcome.category, f"no worker could run the generation: {outcome.message}").info())
        else:
            assert isinstance(outcome, Canceled)
            self.cancel(conversation, outcome.reason)

    def _fail_run(self, conversation: ConversationRecord, active: ActiveGeneration, category: LLMErrorCategory, message: str, reason: str,
                  *, at_once: bool = False) -> None:
        """End the run with an error the daemon found (not one the run reported), then
        tear its worker down: it may still be running. `at_once`: do not wait for its
        workspace to be settled (the daemon could not settle it)."""
        if not active.record.done.is_set():
            error = LLMError(category, message, retryable=False, details={"reason": reason}).info()
            if at_once:  # a workspace it changed is left as it is: say so
                result = "restore_failed" if self._workspaces.changed(active.spec) else "unchanged"
                self._finish(conversation, active, error=self._workspaces.said(active.failure or error, result, [message]))
            else:
                self._finish_failed(conversation, active, error)
        if active.handle is not None:
            active.handle.cancel(reason)

    def _finish_failed(self, conversation: ConversationRecord, active: ActiveGeneration, error: ErrorInfo) -> None:
        """End the run with `error`: at once if it changed nothing; else once its
        workspace is restored (`_run_generation`), its outcome saying so. A cancel that
        comes meanwhile settles it first, as a cancel does."""
        if active.failure is not None:
            return  # failed already: the first error is the run's
        if self._workspaces.changed(active.spec):
            active.failure = error
        else:
            self._finish(conversation, active, error=self._workspaces.said(error, "unchanged", []))

    def _finish(
        self, conversation: ConversationRecord, active: ActiveGeneration, *, success: RunSucceeded | None = None, error: ErrorInfo | None = None
    ) -> None:
        record = active.record
        if success is not None:
            for message in success.messages:
                self._conversations.append(conversation, kind="message", role=message.role, content=message.content, data=message.metadata)
            for artifact in success.artifacts:  # with the messages, in the same transaction
                self._conversations.append(conversation, kind="note", event="artifact_recorded",
                                           data={"run_id": record.run_id, "ref": record.ref, "kind": artifact.kind, "data": artifact.data})
            record.result = success.result
            status = "completed"
        else:
            record.error = error = self._keep_partial(conversation, active, error)
            status = "failed"
        self._conversations.append(conversation, kind="note", event="run_finished", data={"run_id": record.run_id, "status": status})
        self.telemetry.run_finished(
            active.spec.mode, _backend_label(active.spec), status, error.category if error else None, active.run_seconds()
        )
        self._settle(conversation, active, GenerationResult(ref=record.ref, result=record.result, error=record.error))

    def cancel_all(self, conversation: ConversationRecord, reason: str) -> None:
        """Cancel the conversation's queued generations, then its active one, with `reason`."""
        while conversation.queue:
            self._settle_queued(conversation, conversation.queue.popleft(), reason=reason)
        if conversation.active is not None:
            self.cancel(conversation, reason)

    def cancel(self, conversation: ConversationRecord, reason: str, *, start_next: bool = True) -> None:
        """Cancel the conversation's active run; then its first queued one starts,
        unless `start_next` is false (a run that interrupts it starts instead)."""
        active = conversation.active
        assert active is not None
        record = active.record
        record.canceled = reason
        self._keep_partial(conversation, active, None)
        self._conversations.append(conversation, kind="note", event="cancel_requested", data={"reason": reason, "ref": record.ref})
        self._conversations.append(
            conversation, kind="note", event="run_finished", data={"run_id": record.run_id, "status": "canceled", "reason": reason}
        )
        self.telemetry.run_finished(active.spec.mode, _backend_label(active.spec), "canceled", "canceled", active.run_seconds())
        self._settle(conversation, active, CanceledNote(ref=record.ref, reason=reason), start_next=False)
        if active.handle is not None:
            active.handle.cancel(reason)  # termination begins; it completes in the executor
        else:
            active.queue_scope.cancel()  # still waiting for admission: leave the queue
        if active.pause is not None:  # paused
            active.pause = None
            self._approval_deadlines.pop(record.ref, None)
            if not active.driven:  # no task drives it (its last leg's has ended): one settles it now
                self._spawn(conversation, active, self._conclude)
        if start_next:
            self._start_next(conversation)

    def _keep_partial(self, conversation: ConversationRecord, active: ActiveGeneration, error: ErrorInfo | None) -> ErrorInfo | None:
        """A run that does not complete keeps what it streamed: journaled as a note
        (never as a message: the history does not change), and in its error's details."""
        partial = active.partial
        if not partial:
            return error
        self._conversations.append(conversation, kind="note", event="partial_output",
                                   data={"run_id": active.record.run_id, "ref": active.record.ref, "text": partial.text,
                                         "truncated": partial.truncated, "tool_trace": partial.tools})
        if error is None or not partial.text:
            return error
        return msgspec.structs.replace(error, details={**(error.details or {}), "partial_text": partial.text})

    def _settle(self, conversation: ConversationRecord, active: ActiveGeneration, note: Notification, *, start_next: bool = True) -> None:
        terminal, frame = self._close_record(active.record)
        conversation.active = None
        if active.owner is not None:
            if active.spec.events:
                self._notify(active.owner, terminal, frame)
            self._notify(active.owner, note)
        if start_next:
            self._start_next(conversation)

    def _observe_cleanup(self, handle: RunHandle) -> None:
        report = handle.cleanup
        if report is None:
            return  # no process ran (in-process executor, or no worker was available)
        if not report.verified:
            self.telemetry.cleanup_failures.inc()
        if isinstance(handle.outcome, Canceled):
            self.telemetry.cancel_reaped_seconds.observe(report.reaped_after_ms / 1000)

    def _close_record(self, record: GenerationRecord) -> tuple[GenerationEvent, bytes]:
        """Settle `record`: its terminal event ends its events, journaled with its outcome."""
        record.finished_at = time.time()
        record.done.set()
        if record.canceled is not None:
            terminal = GenerationEvent(record.ref, "canceled", reason=record.canceled)
        elif record.error is not None:
            terminal = GenerationEvent(record.ref, "failed", error=record.error)
        else:
            terminal = GenerationEvent(record.ref, "completed")
        assert record.events is not None
        frame = self.streams.end(record.events, terminal)
        terminal = msgspec.structs.replace(terminal, seq=record.events.last_seq)
        record.events = None
        outcome = StoredOutcome(result=record.result, error=record.error, canceled=record.canceled)
        self._journal.submit(GenerationFinished(record.ref, record.finished_at, outcome))
        return terminal, frame

    async def _expire_outcomes(self) -> None:
        while True:
            await trio.sleep(max(1.0, self._retention_s / 10))
            horizon = time.time() - self._retention_s
            expired = [r for r, g in self._generations.items() if g.finished_at is not None and g.finished_at < horizon]
            for ref in expired:
                del self._generations[ref]
            if expired:
                self._journal.submit(ForgetGenerations(expired))


def _backend_label(spec: RunSpec) -> str:
    return spec.request.backend.name if spec.request is not None else "unknown"


def _run_fields(conversation: ConversationRecord, active: ActiveGeneration) -> dict[str, Any]:
    project, id_ = conversation.key
    fields: dict[str, Any] = {"ref": active.record.ref, "run_id": active.record.run_id, "conversation": id_}
    if project is not None:
        fields["project"] = project
    fields.update(mode=active.spec.mode, backend=_backend_label(active.spec))
    return fields
