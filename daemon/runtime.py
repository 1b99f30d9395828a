"""Conversations and their generations: the contract's semantics, transport-free.

The `Runtime` owns every conversation's journal and is its only writer. Handlers run
on the Trio loop and mutate state synchronously (no await between a check and its
write), so commands to one conversation take effect strictly in arrival order and a
run has exactly one outcome: whichever of commit, failure or cancel settles its
`GenerationRecord` first; the others see it settled and change nothing.

It hands runs to an executor (the worker supervisor) and sends notifications through
the `notify` callable it is given; the ZeroMQ front (`daemon.server`) supplies both.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any, Callable, Hashable

import msgspec
import trio

from genvisor.errors import (
    AwaitTimeout,
    EmptyMessage,
    ErrorInfo,
    GenerationCanceled,
    GenerationInProgress,
    InvalidLocator,
    InvalidOptions,
    LLMError,
    NoGenerationInProgress,
    NotFound,
)
from genvisor.ipc.frames import Locator
from genvisor.modes.assemble import Defaults, build_run_spec
from genvisor.modes.conversation import JournalEntry, apply
from genvisor.modes.llm import RunFailed, RunOutcome, RunSpec, RunSucceeded
from genvisor.supervisor.runs import Canceled, Completed, Crashed, DeadlineExceeded, RunHandle, Supervisor, Unavailable
from genvisor.types import Conversation, DerivedState, GenerationCanceled as CanceledNote, GenerationEvent, GenerationResult, LLMResult, Notification

log = logging.getLogger("genvisor.daemon")

Owner = Hashable
Notify = Callable[[Owner, Notification], None]
ConversationKey = tuple[str | None, str]

_encoder = msgspec.msgpack.Encoder()
_outcome_decoder = msgspec.msgpack.Decoder(RunOutcome)
_event_decoder = msgspec.msgpack.Decoder(GenerationEvent)


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
        self.finished_at: float | None = None

    def outcome(self) -> LLMResult:
        if self.canceled is not None:
            raise GenerationCanceled(self.canceled, self.ref)
        if self.error is not None:
            raise self.error.to_exception()
        assert self.result is not None
        return self.result


class ActiveGeneration:
    def __init__(self, record: GenerationRecord, owner: Owner, events: bool) -> None:
        self.record = record
        self.owner = owner
        self.events = events
        self.handle: RunHandle | None = None


class ConversationRecord:
    def __init__(self, key: ConversationKey, metadata: dict[str, Any]) -> None:
        self.key = key
        self.metadata = metadata
        self.journal: list[JournalEntry] = []
        self.state = DerivedState()
        self.active: ActiveGeneration | None = None

    def view(self) -> Conversation:
        return Conversation(id=self.key[1], project_id=self.key[0], metadata=self.metadata, state=self.state)


class Runtime:
    def __init__(self, *, supervisor: Supervisor, defaults: Defaults, deadline_grace_s: float, retention_s: float, notify: Notify) -> None:
        self._supervisor = supervisor
        self._defaults = defaults
        self._deadline_grace_s = deadline_grace_s
        self._retention_s = retention_s
        self._notify = notify
        self._conversations: dict[ConversationKey, ConversationRecord] = {}
        self._generations: dict[str, GenerationRecord] = {}
        self._nursery: trio.Nursery | None = None
        self._admitting = True

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._expire_outcomes)
            task_status.started()
            await trio.sleep_forever()

    def shutdown(self) -> None:
        """Stop admitting and cancel every active run with reason "daemon_shutdown"."""
        self._admitting = False
        for conversation in self._conversations.values():
            if conversation.active is not None:
                self._cancel(conversation, "daemon_shutdown")

    @property
    def active_generations(self) -> int:
        return sum(1 for c in self._conversations.values() if c.active is not None)

    # ---- conversation calls ------------------------------------------------------------

    def conversation(self, loc: Locator) -> Conversation:
        return self._fetch(loc).view()

    def send_user_message(self, loc: Locator, content: str, metadata: dict[str, Any] | None) -> Conversation:
        key = _key(loc)
        if not content.strip():
            raise EmptyMessage("message content is blank")
        existing = self._conversations.get(key)
        if existing is not None and existing.active is not None:
            raise GenerationInProgress(f"conversation {key[1]!r} has an active generation")
        conversation = existing or self._create(key)
        self._append(conversation, kind="message", role="user", content=content, data=dict(metadata or {}))
        return conversation.view()

    # ---- generation calls --------------------------------------------------------------

    def generate(self, loc: Locator, options: dict[str, Any], owner: Owner) -> str:
        key = _key(loc)
        conversation = self._conversations.get(key)
        if conversation is not None and conversation.active is not None:
            raise GenerationInProgress(f"conversation {key[1]!r} has an active generation")
        if not self._admitting:
            raise GenerationCanceled("daemon_shutdown")
        conversation = conversation or self._create(key)
        ref = "gen_" + secrets.token_urlsafe(18)
        run_id = "run_" + secrets.token_hex(8)
        spec = build_run_spec(
            ref=ref, run_id=run_id, conversation_id=key[1], state=conversation.state, raw_options=options, defaults=self._defaults
        )
        record = GenerationRecord(ref, key, run_id)
        self._generations[ref] = record
        active = ActiveGeneration(record, owner, events=spec.events)
        conversation.active = active
        self._append(conversation, kind="note", event="run_started", data={"run_id": run_id, "mode": "coding", "ref": ref})
        if spec.request is None:
            assert spec.error is not None
            self._finish(conversation, active, error=spec.error)
            return ref
        deadline = trio.current_time() + spec.request.timeout_ms / 1000 + self._deadline_grace_s
        active.handle = self._supervisor.start_run(
            _encoder.encode(spec), on_progress=lambda raw: self._on_progress(active, raw), deadline=deadline
        )
        assert self._nursery is not None
        self._nursery.start_soon(self._settle_when_done, conversation, active, spec)
        return ref

    async def await_generation(self, loc: Locator, ref: str, timeout_ms: int, cancel_on_timeout: bool, cancel_reason: str) -> LLMResult:
        key = _key(loc)
        record = self._generations.get(ref)
        if record is None or record.key != key:
            raise NotFound(f"no generation {ref!r} for this conversation (unknown or expired)")
        if timeout_ms < 0:
            raise InvalidOptions("timeout_ms", "must be >= 0")
        with trio.move_on_after(timeout_ms / 1000):
            await record.done.wait()
        if not record.done.is_set():
            conversation = self._conversations[key]
            # Ref-checked: a timeout never cancels a newer generation of the conversation.
            if cancel_on_timeout and conversation.active is not None and conversation.active.record is record:
                self._cancel(conversation, cancel_reason)
            raise AwaitTimeout(f"generation {ref} did not finish within {timeout_ms} ms")
        return record.outcome()

    def cancel_generation(self, loc: Locator, reason: str) -> None:
        conversation = self._fetch(loc)
        if conversation.active is None:
            raise NoGenerationInProgress(f"conversation {conversation.key[1]!r} has no active generation")
        self._cancel(conversation, reason)

    async def send_and_generate(
        self, loc: Locator, content: str, message_metadata: dict[str, Any] | None, options: dict[str, Any], owner: Owner,
        timeout_ms: int, cancel_on_timeout: bool, cancel_reason: str,
    ) -> tuple[Conversation, LLMResult]:
        self.send_user_message(loc, content, message_metadata)
        ref = self.generate(loc, options, owner)
        result = await self.await_generation(loc, ref, timeout_ms, cancel_on_timeout, cancel_reason)
        return self.conversation(loc), result

    # ---- run lifecycle -----------------------------------------------------------------

    def _on_progress(self, active: ActiveGeneration, raw: msgspec.Raw) -> None:
        if active.events and not active.record.done.is_set():
            self._notify(active.owner, _event_decoder.decode(raw))

    async def _settle_when_done(self, conversation: ConversationRecord, active: ActiveGeneration, spec: RunSpec) -> None:
        assert active.handle is not None
        outcome = await active.handle.wait()
        if active.record.done.is_set():
            return  # canceled first: the run's result, if any, is dropped
        if isinstance(outcome, Completed):
            run_outcome = _outcome_decoder.decode(outcome.outcome)
            if isinstance(run_outcome, RunSucceeded):
                self._finish(conversation, active, success=run_outcome)
            else:
                self._finish(conversation, active, error=run_outcome.error)
        elif isinstance(outcome, Crashed):
            self._finish(conversation, active, error=LLMError("unknown", "generation worker crashed", details=outcome.details).info())
        elif isinstance(outcome, DeadlineExceeded):
            assert spec.request is not None
            message = f"generation deadline passed ({spec.request.timeout_ms} ms + {self._deadline_grace_s * 1000:.0f} ms grace)"
            self._finish(conversation, active, error=LLMError("timeout", message).info())
        elif isinstance(outcome, Unavailable):
            self._finish(conversation, active, error=LLMError("unknown", f"no worker could run the generation: {outcome.message}").info())
        else:
            assert isinstance(outcome, Canceled)
            self._cancel(conversation, outcome.reason)

    def _finish(self, conversation: ConversationRecord, active: ActiveGeneration, *, success: RunSucceeded | None = None, error: ErrorInfo | None = None) -> None:
        record = active.record
        if success is not None:
            for message in success.messages:
                self._append(conversation, kind="message", role=message.role, content=message.content, data=message.metadata)
            record.result = success.result
            status = "completed"
        else:
            record.error = error
            status = "failed"
        self._append(conversation, kind="note", event="run_finished", data={"run_id": record.run_id, "status": status})
        self._settle(conversation, active, GenerationResult(ref=record.ref, result=record.result, error=record.error))

    def _cancel(self, conversation: ConversationRecord, reason: str) -> None:
        active = conversation.active
        assert active is not None
        record = active.record
        record.canceled = reason
        self._append(conversation, kind="note", event="cancel_requested", data={"reason": reason, "ref": record.ref})
        self._append(conversation, kind="note", event="run_finished", data={"run_id": record.run_id, "status": "canceled", "reason": reason})
        self._settle(conversation, active, CanceledNote(ref=record.ref, reason=reason))
        if active.handle is not None:
            active.handle.cancel(reason)  # termination begins; it completes in the supervisor

    def _settle(self, conversation: ConversationRecord, active: ActiveGeneration, note: Notification) -> None:
        record = active.record
        record.finished_at = time.monotonic()
        record.done.set()
        conversation.active = None
        self._notify(active.owner, note)

    async def _expire_outcomes(self) -> None:
        while True:
            await trio.sleep(max(1.0, self._retention_s / 10))
            horizon = time.monotonic() - self._retention_s
            for ref in [r for r, g in self._generations.items() if g.finished_at is not None and g.finished_at < horizon]:
                del self._generations[ref]

    # ---- journal -----------------------------------------------------------------------

    def _create(self, key: ConversationKey) -> ConversationRecord:
        metadata: dict[str, Any] = {"project_id": key[0]} if key[0] is not None else {}
        conversation = ConversationRecord(key, metadata)
        self._conversations[key] = conversation
        return conversation

    def _fetch(self, loc: Locator) -> ConversationRecord:
        key = _key(loc)
        conversation = self._conversations.get(key)
        if conversation is None:
            raise NotFound(f"no conversation {key[1]!r}" + (f" in project {key[0]!r}" if key[0] is not None else ""))
        return conversation

    def _append(self, conversation: ConversationRecord, **fields: Any) -> None:
        seq = len(conversation.journal) + 1
        entry = JournalEntry(entry_id=f"e{seq}_{secrets.token_hex(4)}", seq=seq, at=time.time(), **fields)
        conversation.journal.append(entry)
        conversation.state = apply(conversation.state, entry)


def _key(loc: Locator) -> ConversationKey:
    if not loc.id.strip() or (loc.project_id is not None and not loc.project_id.strip()):
        raise InvalidLocator("locator parts must be non-blank strings")
    return (loc.project_id, loc.id)

