"""Conversations and their generations: the contract's semantics, transport-free.

The `Runtime` owns every conversation's journal and is its only writer. Handlers run
on the Trio loop and mutate state synchronously (no await between a check and its
write), so commands to one conversation take effect strictly in arrival order and a
run has exactly one outcome: whichever of commit, failure or cancel settles its
`GenerationRecord` first; the others find it settled and change nothing.

It hands runs to an `Executor` (worker processes in the daemon, the in-process
executor when embedded) and sends notifications through the `notify` callable it is
given. Nothing here knows about sockets.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Protocol

import msgspec
import trio

from genvisor.errors import (
    Diagnostic,
    AlreadyStarted,
    AwaitTimeout,
    EmptyMessage,
    ErrorInfo,
    ForceCancelReasonRequired,
    GenerationCanceled,
    GenerationInProgress,
    InvalidLocator,
    InvalidModeConfig,
    InvalidOptions,
    LLMError,
    NoGenerationInProgress,
    NotFound,
    RunInProgress,
    UnsupportedMode,
)
from genvisor.ipc.frames import Locator
from genvisor.modes.assemble import RunDefaults, build_run_spec, context_window, transport_keys
from genvisor.modes.conversation import apply, initial_state
from genvisor.modes.llm import RunOutcome, RunSpec, RunSucceeded
from genvisor.modes.registry import registry
from genvisor.supervisor.runs import Canceled, Completed, Crashed, DeadlineExceeded, RunHandle, Unavailable
from genvisor.types import (
    ROLES,
    ContextMessage,
    Conversation,
    DerivedState,
    GenerationCanceled as CanceledNote,
    GenerationEvent,
    GenerationResult,
    JournalEntry,
    LLMResult,
    Message,
    Notification,
    TimelineEntry,
)
from genvisor.daemon.telemetry import Telemetry

Owner = Hashable
Notify = Callable[[Owner, Notification], None]
ConversationKey = tuple[str | None, str]

_encoder = msgspec.msgpack.Encoder()
_outcome_decoder = msgspec.msgpack.Decoder(RunOutcome)
_event_decoder = msgspec.msgpack.Decoder(GenerationEvent)


class Executor(Protocol):
    """Runs a RunSpec somewhere and reports one outcome on the handle it returns."""

    def start_run(self, spec: bytes, *, on_progress: Callable[[msgspec.Raw], None], deadline: float | None) -> RunHandle: ...


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
    def __init__(self, record: GenerationRecord, owner: Owner, spec: RunSpec) -> None:
        self.record = record
        self.owner = owner
        self.spec = spec
        self.handle: RunHandle | None = None


class ConversationRecord:
    def __init__(self, key: ConversationKey, metadata: dict[str, Any]) -> None:
        self.key = key
        self.metadata = metadata
        self.journal: list[JournalEntry] = []
        self.state = initial_state()
        self.active: ActiveGeneration | None = None

    def view(self) -> Conversation:
        return Conversation(id=self.key[1], project_id=self.key[0], metadata=self.metadata, state=self.state)


class Runtime:
    def __init__(
        self, *, executor: Executor, defaults: RunDefaults, deadline_grace_s: float, retention_s: float, workspaces: Path, notify: Notify
    ) -> None:
        self._executor = executor
        self._workspaces = workspaces
        self._defaults = defaults
        self._deadline_grace_s = deadline_grace_s
        self._retention_s = retention_s
        self._notify = notify
        self._conversations: dict[ConversationKey, ConversationRecord] = {}
        self._generations: dict[str, GenerationRecord] = {}
        self._nursery: trio.Nursery | None = None
        self._admitting = True
        self.telemetry = Telemetry(modes=list(registry()), backends=list(defaults.backends))

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

    # ---- conversations -----------------------------------------------------------------

    def start_conversation(self, id: str, project_id: str | None, metadata: Any) -> Conversation:
        key = _key(Locator(project_id, id))
        if key in self._conversations:
            raise AlreadyStarted(f"conversation {id!r} already exists")
        return self._create(key, _metadata(metadata)).view()

    def ensure_conversation(self, id: str, project_id: str | None, metadata: Any) -> tuple[Conversation, str]:
        key = _key(Locator(project_id, id))
        checked = _metadata(metadata)
        existing = self._conversations.get(key)
        if existing is not None:
            return existing.view(), "existing"
        return self._create(key, checked).view(), "started"

    def conversation(self, loc: Locator) -> Conversation:
        return self._fetch(loc).view()

    def derived_state(self, loc: Locator) -> DerivedState:
        return self._fetch(loc).state

    def conversation_messages(self, loc: Locator, max_messages: int | None, roles: list[Any] | None) -> list[Message]:
        messages = self._fetch(loc).state.messages
        _check_limit("max_messages", max_messages)
        if roles is not None:
            wanted = {r for r in roles if isinstance(r, str) and r in ROLES}
            messages = [m for m in messages if m.role in wanted]
        return messages[-max_messages:] if max_messages else ([] if max_messages == 0 else list(messages))

    def conversation_llm_context(self, loc: Locator, max_messages: int, include_system: bool, include_tool: bool) -> list[ContextMessage]:
        state = self._fetch(loc).state
        _check_limit("max_messages", max_messages)
        return context_window(state.messages, max_messages, include_system, include_tool)

    def conversation_timeline(self, loc: Locator) -> list[TimelineEntry]:
        return [
            TimelineEntry(e.seq, e.at, "message" if e.kind == "message" else "event", e.role, e.content, e.event, e.data)
            for e in self._fetch(loc).journal
        ]

    def conversation_thread_entries(self, loc: Locator) -> list[JournalEntry]:
        return list(self._fetch(loc).journal)

    def send_user_message(self, loc: Locator, content: str, metadata: Any) -> Conversation:
        return self._record_message(loc, "user", content, metadata)

    def record_assistant_message(self, loc: Locator, content: str, metadata: Any) -> Conversation:
        return self._record_message(loc, "assistant", content, metadata)

    def configure_llm(self, loc: Locator, backend: str | None, provider: str | None, model: str | None, options: Any) -> Conversation:
        key = _key(loc)
        if options is not None and not isinstance(options, dict):
            raise InvalidOptions("options", "must be a mapping")
        if named := transport_keys(options or {}):
            raise InvalidOptions(f"options.{named[0]}", "where and how a request travels is the daemon config's, not a client's")
        conversation = self._writable(key)
        self._append(conversation, kind="note", event="llm_configured",
                     data={"backend": backend, "provider": provider, "model": model, "options": options or {}})
        return conversation.view()

    def configure_skills(self, loc: Locator, enabled: list[Any]) -> Conversation:
        conversation = self._writable(_key(loc))
        skills: list[str] = []
        for skill in enabled:
            if isinstance(skill, str) and skill.strip() and skill.strip() not in skills:
                skills.append(skill.strip())
        self._append(conversation, kind="note", event="skills_configured", data={"skills": skills})
        return conversation.view()

    def stop_conversation(self, loc: Locator) -> None:
        """Cancel the active generation with reason "conversation_stopped" (the owner
        gets GenerationCanceled). The conversation's journal stays: it is its state."""
        conversation = self._fetch(loc)
        if conversation.active is not None:
            self._cancel(conversation, "conversation_stopped")

    # ---- modes -------------------------------------------------------------------------

    def mode(self, loc: Locator) -> str:
        return self._fetch(loc).state.mode

    def configure_mode(
        self, loc: Locator, mode: str, mode_state: Any, *, reason: str | None, force: bool, cancel_reason: str | None, cause_id: str | None
    ) -> Conversation:
        key = _key(loc)
        conversation = self._conversations.get(key) or self._create(key, {})
        modes = registry()
        note = {"mode": mode, "from": conversation.state.mode, "reason": reason, "cause_id": cause_id}

        def reject(error: Exception) -> Exception:
            self._append(conversation, kind="note", event="mode_switch_rejected", data={**note, "error": type(error).__name__})
            return error

        if mode not in modes:
            raise reject(UnsupportedMode(mode, list(modes)))
        if mode_state is not None and not isinstance(mode_state, dict):
            diagnostics = [Diagnostic("invalid_type", "", "mode_state must be a mapping")]
        else:
            diagnostics = modes[mode].validate(mode_state or {})
        if diagnostics:
            raise reject(InvalidModeConfig(mode, diagnostics))
        if conversation.active is not None:
            if not force:
                raise reject(RunInProgress(f"conversation {key[1]!r} has an active run; use force=True with a cancel_reason"))
            if not (isinstance(cancel_reason, str) and cancel_reason.strip()):
                raise reject(ForceCancelReasonRequired("a forced mode switch needs a non-blank cancel_reason"))
            self._cancel(conversation, cancel_reason)
        event = "mode_configured" if mode == conversation.state.mode else "mode_switch_accepted"
        self._append(conversation, kind="note", event=event, data={**note, "mode_state": mode_state or {}, "forced": force})
        return conversation.view()

    # ---- generations -------------------------------------------------------------------

    def generate(self, loc: Locator, options: dict[str, Any], owner: Owner) -> str:
        key = _key(loc)
        conversation = self._conversations.get(key)
        if conversation is not None and conversation.active is not None:
            raise GenerationInProgress(f"conversation {key[1]!r} has an active generation")
        if not self._admitting:
            raise GenerationCanceled("daemon_shutdown")
        conversation = conversation or self._create(key, {})
        ref = "gen_" + secrets.token_urlsafe(18)
        run_id = "run_" + secrets.token_hex(8)
        spec = build_run_spec(
            ref=ref, run_id=run_id, conversation_id=key[1], state=conversation.state, raw_options=options,
            defaults=self._defaults, workspace=self._workspace(conversation),
        )
        record = GenerationRecord(ref, key, run_id)
        self._generations[ref] = record
        active = ActiveGeneration(record, owner, spec)
        conversation.active = active
        self._append(conversation, kind="note", event="run_started", data={"run_id": run_id, "mode": spec.mode, "ref": ref})
        self.telemetry.run_started(spec.mode, _backend_label(spec))
        if spec.request is None:
            assert spec.error is not None
            self._finish(conversation, active, error=spec.error)
            return ref
        deadline = trio.current_time() + spec.request.timeout_ms / 1000 + self._deadline_grace_s
        active.handle = self._executor.start_run(_encoder.encode(spec), on_progress=lambda raw: self._on_progress(active, raw), deadline=deadline)
        assert self._nursery is not None
        self._nursery.start_soon(self._settle_when_done, conversation, active)
        return ref

    async def await_generation(self, loc: Locator, ref: str, timeout_ms: int, cancel_on_timeout: bool, cancel_reason: str) -> LLMResult:
        key = _key(loc)
        record = self._generations.get(ref)
        if record is None or record.key != key:
            raise NotFound(f"no generation {ref!r} for this conversation (unknown or expired)")
        _check_limit("timeout_ms", timeout_ms)
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
        self, loc: Locator, content: str, message_metadata: Any, options: dict[str, Any], owner: Owner,
        timeout_ms: int, cancel_on_timeout: bool, cancel_reason: str,
    ) -> tuple[Conversation, LLMResult]:
        self.send_user_message(loc, content, message_metadata)
        ref = self.generate(loc, options, owner)
        result = await self.await_generation(loc, ref, timeout_ms, cancel_on_timeout, cancel_reason)
        return self.conversation(loc), result

    # ---- run lifecycle -----------------------------------------------------------------

    def _on_progress(self, active: ActiveGeneration, raw: msgspec.Raw) -> None:
        if active.spec.events and not active.record.done.is_set():
            self._notify(active.owner, _event_decoder.decode(raw))

    async def _settle_when_done(self, conversation: ConversationRecord, active: ActiveGeneration) -> None:
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
            assert active.spec.request is not None
            message = f"generation deadline passed ({active.spec.request.timeout_ms} ms + {self._deadline_grace_s * 1000:.0f} ms grace)"
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
        self.telemetry.run_finished(active.spec.mode, _backend_label(active.spec), status, error.category if error else None)
        self._settle(conversation, active, GenerationResult(ref=record.ref, result=record.result, error=record.error))

    def _cancel(self, conversation: ConversationRecord, reason: str) -> None:
        active = conversation.active
        assert active is not None
        record = active.record
        record.canceled = reason
        self._append(conversation, kind="note", event="cancel_requested", data={"reason": reason, "ref": record.ref})
        self._append(conversation, kind="note", event="run_finished", data={"run_id": record.run_id, "status": "canceled", "reason": reason})
        self.telemetry.run_finished(active.spec.mode, _backend_label(active.spec), "canceled", "canceled")
        self._settle(conversation, active, CanceledNote(ref=record.ref, reason=reason))
        if active.handle is not None:
            active.handle.cancel(reason)  # termination begins; it completes in the executor

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

    def _workspace(self, conversation: ConversationRecord) -> str:
        """`metadata["workspace"]`, else the conversation's own directory under the state
        dir (created by the worker, which does every side effect of a run)."""
        chosen = conversation.metadata.get("workspace")
        if isinstance(chosen, str) and os.path.isabs(chosen):
            return chosen
        project, id_ = conversation.key
        digest = hashlib.sha256(repr(conversation.key).encode()).hexdigest()[:12]
        return str(self._workspaces / _safe(project or "_") / f"{_safe(id_)[:40]}-{digest}")

    # ---- journal -----------------------------------------------------------------------

    def _record_message(self, loc: Locator, role: str, content: str, metadata: Any) -> Conversation:
        key = _key(loc)
        if not content.strip():
            raise EmptyMessage("message content is blank")
        checked = _metadata(metadata, field="metadata")
        conversation = self._writable(key)
        self._append(conversation, kind="message", role=role, content=content, data=checked)
        return conversation.view()

    def _writable(self, key: ConversationKey) -> ConversationRecord:
        """The conversation to change (created on first use), unless a run is active."""
        conversation = self._conversations.get(key)
        if conversation is not None and conversation.active is not None:
            raise GenerationInProgress(f"conversation {key[1]!r} has an active generation")
        return conversation or self._create(key, {})

    def _create(self, key: ConversationKey, metadata: dict[str, Any]) -> ConversationRecord:
        if key[0] is not None:
            metadata = {**metadata, "project_id": key[0]}
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


def _metadata(value: Any, field: str = "metadata") -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidOptions(field, "must be a mapping")
    return dict(value)


def _check_limit(field: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise InvalidOptions(field, "must be >= 0")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"


def _backend_label(spec: RunSpec) -> str:
    return spec.request.backend.name if spec.request is not None else "unknown"
