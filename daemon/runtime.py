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

import dataclasses
import hashlib
import logging
import math
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
    LLMErrorCategory,
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
    Overloaded,
    RevertConflict,
    RunInProgress,
    UnsupportedMode,
)
from genvisor.ipc.channel import MAX_CHANNEL_FRAME
from genvisor.ipc.frames import Locator
from genvisor.logevent import RateLimit, event
from genvisor.modes.assemble import context_window, transport_keys
from genvisor.modes.conversation import apply, initial_state
from genvisor.modes.llm import RunDefaults, RunSpec, RunSucceeded
from genvisor.modes.protocol import AssemblyRequest, MalformedOutcome, decode_outcome
from genvisor.modes import workspace_snapshot
from genvisor.modes.registry import registry
from genvisor.supervisor.admission import Admission, Slot
from genvisor.supervisor.runs import Broken, Canceled, Completed, Crashed, DeadlineExceeded, ExecutorHealth, RunHandle, Unavailable
from genvisor.types import (
    ROLES,
    ContextMessage,
    Conversation,
    DaemonInfo,
    DaemonStatus,
    DerivedState,
    GenerationCanceled as CanceledNote,
    GenerationEvent,
    GenerationResult,
    JournalEntry,
    LLMResult,
    Message,
    Notification,
    Plan,
    PlanRecord,
    TimelineEntry,
    WorkspaceChanges,
)
from genvisor.daemon.durable import DurableLog
from genvisor.daemon.store import (
    AppendEntry,
    CreateConversation,
    ForgetGenerations,
    GenerationFinished,
    GenerationStarted,
    Snapshot,
    StoredOutcome,
    StoreFailed,
)
from genvisor.daemon.telemetry import Telemetry

Owner = Hashable
Notify = Callable[[Owner, Notification], None]
ConversationKey = tuple[str | None, str]

log = logging.getLogger("genvisor.daemon")

# A run's spec travels to its worker as one channel frame; the Start frame around it
# takes a few bytes, kept well clear of.
MAX_SPEC_BYTES = MAX_CHANNEL_FRAME - 64 * 1024

_encoder = msgspec.msgpack.Encoder()
_event_decoder = msgspec.msgpack.Decoder(GenerationEvent)


class Executor(Protocol):
    """Runs a RunSpec somewhere and reports one outcome on the handle it returns."""

    def start_run(self, spec: bytes, *, on_progress: Callable[[msgspec.Raw], None], deadline: float | None) -> RunHandle: ...

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

    def outcome(self) -> LLMResult:
        if self.canceled is not None:
            raise GenerationCanceled(self.canceled, self.ref)
        if self.error is not None:
            raise self.error.to_exception()
        assert self.result is not None
        return self.result


class ActiveGeneration:
    def __init__(self, record: GenerationRecord, owner: Owner, spec: RunSpec, slot: Slot, encoded_spec: bytes) -> None:
        self.record = record
        self.owner = owner
        self.spec = spec
        self.encoded_spec = encoded_spec
        self.slot = slot
        self.queue_scope = trio.CancelScope()  # cancelled when the run ends while still queued
        self.handle: RunHandle | None = None
        self.created_at = time.perf_counter()
        self.started_at: float | None = None  # perf_counter, once admitted to a worker
        # The error of a run that changed its workspace: its outcome waits for the
        # workspace to be restored, so that it can say what became of it.
        self.failure: ErrorInfo | None = None

    def run_seconds(self) -> float | None:
        return None if self.started_at is None else time.perf_counter() - self.started_at


@dataclasses.dataclass(frozen=True)
class ChangeSet:
    """What a `turn_changes` or `revert_turn` names: a run's (by its run id) or a
    revert's (by its own id) change set."""

    conversation: ConversationRecord
    ref: str
    name: str  # its name in the workspace's snapshot store
    kept: bool  # a completed run's, or a revert: its change set may be kept
    reverts: str | None = None


class ConversationRecord:
    def __init__(self, key: ConversationKey, metadata: dict[str, Any]) -> None:
        self.key = key
        self.metadata = metadata
        self.journal: list[JournalEntry] = []
        self.state = initial_state()
        self.active: ActiveGeneration | None = None
        # Set while no run's workspace is still to be settled (undone, or let go): the
        # next run starts only then, so it never sees a half-undone workspace.
        self.workspace_settled = trio.Event()
        self.workspace_settled.set()

    def view(self) -> Conversation:
        return Conversation(id=self.key[1], project_id=self.key[0], metadata=self.metadata, state=self.state)


class Runtime:
    def __init__(
        self, *, executor: Executor, journal: DurableLog, admission: Admission, defaults: RunDefaults,
        deadline_grace_s: float, retention_s: float, workspaces: Path, notify: Notify, snapshots: Path | None = None,
    ) -> None:
        self._executor = executor
        self._snapshots = snapshots  # None: runs are not transactions (no snapshots taken)
        self.journal = journal
        self.admission = admission
        self._workspaces = workspaces
        self._defaults = defaults
        self._deadline_grace_s = deadline_grace_s
        self._retention_s = retention_s
        self._notify = notify
        self._conversations: dict[ConversationKey, ConversationRecord] = {}
        self._generations: dict[str, GenerationRecord] = {}
        self._nursery: trio.Nursery | None = None
        self._admitting = True
        self._admission_log = RateLimit()
        self._driving = 0  # runs not yet settled to the end (their workspaces included)
        self._drained = trio.Event()
        self._interrupted: list[tuple[ConversationRecord, GenerationRecord]] = []  # by `restore`: workspaces to undo
        self.telemetry = telemetry = Telemetry(modes=list(registry()), backends=list(defaults.backends))
        telemetry.gauge("genvisor_active_workers", "Runs holding a worker slot", lambda: admission.active)
        telemetry.gauge("genvisor_queue_depth", "Admitted runs waiting for a worker slot", lambda: admission.queued)
        telemetry.gauge("genvisor_spare_workers", "Pre-forked workers waiting for a run", lambda: executor.health().spare_workers)
        telemetry.gauge("genvisor_journal_unsynced", "Journal writes not yet durable", lambda: journal.submitted - journal.durable)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.journal.run)
            nursery.start_soon(self._expire_outcomes)
            task_status.started()
            await trio.sleep_forever()

    def restore(self, snapshot: Snapshot) -> int:
        """Take back what the store holds; call once, before serving. A generation that
        was in flight when the daemon died is resolved here, once, as failed with reason
        `daemon_restarted`: its turn never committed (a commit is one transaction), so
        nothing is duplicated. Returns how many were resolved."""
        for stored in snapshot.conversations:
            conversation = ConversationRecord(stored.key, stored.metadata)
            conversation.journal = stored.entries
            for entry in stored.entries:
                conversation.state = apply(conversation.state, entry)
            self._conversations[stored.key] = conversation
        resolved = 0
        for stored_generation in snapshot.generations:
            record = GenerationRecord(stored_generation.ref, stored_generation.key, stored_generation.run_id)
            self._generations[record.ref] = record
            if stored_generation.outcome is None:
                error = LLMError(
                    "unknown", "the daemon restarted while the generation was running; nothing of it was committed",
                    retryable=True, details={"reason": "daemon_restarted"},
                )
                conversation = self._conversations[record.key]
                self._append(conversation, kind="note", event="run_finished",
                             data={"run_id": record.run_id, "status": "failed", "reason": "daemon_restarted"})
                record.error = error.info()
                store = self._snapshot_store(self._workspace(conversation)) if self._snapshots is not None else None
                if store is not None and workspace_snapshot.has_snapshot(store, record.run_id):
                    self._interrupted.append((conversation, record))  # closed once its workspace is undone
                else:
                    record.error = self._with_workspace(record.error, "unchanged", [])
                    self._close_record(record)
                resolved += 1
            else:
                outcome = stored_generation.outcome
                record.result, record.error, record.canceled = outcome.result, outcome.error, outcome.canceled
                record.finished_at = stored_generation.finished_at
                record.done.set()
        return resolved

    async def settle_interrupted(self) -> None:
        """Undo what the runs a killed daemon left unfinished did to their workspaces
        (call after `restore`, before serving): they were resolved as failed, and their
        snapshots, taken before their first change, are still there."""
        interrupted, self._interrupted = self._interrupted, []
        for conversation, record in interrupted:
            workspace = self._workspace(conversation)
            store = self._snapshot_store(workspace)
            settled = await self._settle_in_thread(store, workspace, record.run_id, completed=False)
            result, paths = settled or ("unchanged", [])
            self._record_workspace(conversation, record.run_id, result, paths)
            assert record.error is not None
            record.error = self._with_workspace(record.error, result, paths)
            self._close_record(record)

    async def drained(self) -> None:
        """Return once no run is left: each one's processes gone, its workspace settled
        and journaled (call after `shutdown`)."""
        while self._driving:
            await self._drained.wait()

    def shutdown(self) -> None:
        """Stop admitting and cancel every active run with reason "daemon_shutdown"."""
        self._admitting = False
        for conversation in self._conversations.values():
            if conversation.active is not None:
                self._cancel(conversation, "daemon_shutdown")

    def status(self, info: DaemonInfo, metrics: str | None) -> DaemonStatus:
        t, health = self.telemetry, self._executor.health()
        return DaemonStatus(
            info=info,
            metrics=metrics,
            journal=self.journal.store.describe(),
            journal_unsynced=self.journal.submitted - self.journal.durable,
            conversations=len(self._conversations),
            active_runs=self.admission.active,
            max_active=self.admission.max_active,
            queued_runs=self.admission.queued,
            max_queued=self.admission.max_queued,
            spare_workers=health.spare_workers,
            runs_started=t.total(t.runs_started),
            runs_finished={outcome: t.total(t.runs_finished, outcome=outcome) for outcome in ("completed", "failed", "canceled")},
            admissions_rejected=t.total(t.admissions_rejected),
            requests_received=t.total(t.requests_received),
            frames_rejected=t.total(t.frames_rejected),
            requests_refused_unread=t.total(t.requests_refused_unread),
            events_shed=t.total(t.events_shed),
            cleanup_failures=t.total(t.cleanup_failures),
            zygote_restarts=health.zygote_restarts,
            run_latency=t.summary(t.run_seconds),
            queue_wait=t.summary(t.queue_wait_seconds),
            worker_spawn=t.summary(t.worker_spawn_seconds),
            cancel_reaped=t.summary(t.cancel_reaped_seconds),
        )

    # ---- conversations -----------------------------------------------------------------

    def start_conversation(self, id: str, project_id: str | None, metadata: Any) -> Conversation:
        key = _key(Locator(project_id, id))
        checked = _conversation_metadata(metadata)
        if key in self._conversations:
            raise AlreadyStarted(f"conversation {id!r} already exists")
        return self._create(key, checked).view()

    def ensure_conversation(self, id: str, project_id: str | None, metadata: Any) -> tuple[Conversation, str]:
        key = _key(Locator(project_id, id))
        checked = _conversation_metadata(metadata)
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

    def plans(self, loc: Locator) -> list[PlanRecord]:
        """The plans the conversation's `planning` turns committed, oldest first."""
        return [
            PlanRecord(e.data["ref"], e.data["run_id"], e.at, msgspec.convert(e.data["data"], Plan))
            for e in self._fetch(loc).journal
            if e.event == "artifact_recorded" and e.data.get("kind") == "plan"
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
        slot = self._admit()
        conversation = conversation or self._create(key, {})
        ref = "gen_" + secrets.token_urlsafe(18)
        run_id = "run_" + secrets.token_hex(8)
        spec = self._assemble(AssemblyRequest(
            ref=ref, run_id=run_id, conversation_id=key[1], state=conversation.state, options=options,
            defaults=self._defaults, workspace=self._workspace(conversation),
        ))
        if spec.workspace is not None and self._snapshots is not None:
            spec = msgspec.structs.replace(spec, snapshot_store=self._snapshot_store(spec.workspace),
                                           snapshot_excludes=_excludes(conversation.metadata))
        encoded = _encoder.encode(spec)
        if spec.request is not None and len(encoded) > MAX_SPEC_BYTES:
            error = LLMError("config", f"the run's context is {len(encoded)} bytes, over the {MAX_SPEC_BYTES}-byte limit of a run: "
                                       "lower max_messages or start a new conversation",
                             details={"reason": "context_too_large", "bytes": len(encoded), "limit": MAX_SPEC_BYTES})
            spec = msgspec.structs.replace(spec, request=None, error=error.info())
        record = GenerationRecord(ref, key, run_id)
        self._generations[ref] = record
        active = ActiveGeneration(record, owner, spec, slot, encoded)
        conversation.active = active
        self.journal.submit(GenerationStarted(ref, key, run_id))
        self._append(conversation, kind="note", event="run_started", data={"run_id": run_id, "mode": spec.mode, "ref": ref})
        self.telemetry.run_started(spec.mode, _backend_label(spec))
        event(log, "run.started", **_run_fields(conversation, active))
        if spec.request is None:
            assert spec.error is not None
            slot.release()
            self._finish_failed(conversation, active, spec.error)
            self._log_run_end(conversation, active)
            return ref
        assert self._nursery is not None
        self._driving += 1
        self._nursery.start_soon(self._drive, conversation, active)
        return ref

    @staticmethod
    def _assemble(request: AssemblyRequest) -> RunSpec:
        """Step 1, the mode's: the run's spec from the conversation and the call. A mode
        that cannot, or breaks doing it, gives a spec whose run fails with why."""
        mode = registry().get(request.state.mode)
        base = dict(ref=request.ref, run_id=request.run_id, conversation_id=request.conversation_id, mode=request.state.mode,
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
        key = _key(loc)
        record = self._generations.get(ref)
        if record is None or record.key != key:
            raise NotFound(f"no generation {ref!r} for this conversation (unknown or expired)")
        _check_limit("timeout_ms", timeout_ms)
        return record

    async def await_outcome(self, record: GenerationRecord, timeout_ms: int | None, cancel_on_timeout: bool, cancel_reason: str) -> LLMResult:
        """Wait for `record`'s outcome; `timeout_ms` None waits as long as the run takes."""
        with trio.move_on_after(math.inf if timeout_ms is None else timeout_ms / 1000):
            await record.done.wait()
        if not record.done.is_set():
            conversation = self._conversations[record.key]
            # Ref-checked: a timeout never cancels a newer generation of the conversation.
            if cancel_on_timeout and conversation.active is not None and conversation.active.record is record:
                self._cancel(conversation, cancel_reason)
            raise AwaitTimeout(f"generation {record.ref} did not finish within {timeout_ms} ms")
        return record.outcome()

    async def await_generation(self, loc: Locator, ref: str, timeout_ms: int | None, cancel_on_timeout: bool, cancel_reason: str) -> LLMResult:
        return await self.await_outcome(self.find_generation(loc, ref, timeout_ms), timeout_ms, cancel_on_timeout, cancel_reason)

    def cancel_generation(self, loc: Locator, reason: str) -> None:
        conversation = self._fetch(loc)
        if conversation.active is None:
            raise NoGenerationInProgress(f"conversation {conversation.key[1]!r} has no active generation")
        self._cancel(conversation, reason)

    def send_and_generate(
        self, loc: Locator, content: str, message_metadata: Any, options: dict[str, Any], owner: Owner, timeout_ms: int | None
    ) -> GenerationRecord:
        """The synchronous half of send → generate → await: the message is recorded and
        the run started (or nothing is done) before the next command is looked at."""
        _check_limit("timeout_ms", timeout_ms)
        self._admit().release()  # full: refused before the user message is recorded
        self.send_user_message(loc, content, message_metadata)
        return self._generations[self.generate(loc, options, owner)]

    # ---- change sets -------------------------------------------------------------------

    def find_change_set(self, loc: Locator, ref: str) -> ChangeSet:
        """The synchronous half of `turn_changes` and `revert_turn`: what `ref` names —
        a generation of this conversation that has ended, or a revert of it."""
        conversation = self._fetch(loc)
        for entry in reversed(conversation.journal):
            data = entry.data
            if entry.event == "run_started" and data.get("ref") == ref:
                if conversation.active is not None and conversation.active.record.ref == ref:
                    raise GenerationInProgress(f"generation {ref} is still running: await it first")
                run_id = data["run_id"]
                finished = _note(conversation, "run_finished", run_id) or {}
                return ChangeSet(conversation, ref, run_id, kept=finished.get("status") == "completed")
            if entry.event == "turn_reverted" and data.get("revert") == ref:
                return ChangeSet(conversation, ref, ref, kept=True, reverts=data.get("ref"))
        raise NotFound(f"no generation or revert {ref!r} in this conversation")

    async def turn_changes(self, change_set: ChangeSet) -> WorkspaceChanges:
        """What the turn (or revert) did to the workspace; for a run that did not
        complete, what became of the workspace once it was settled."""
        conversation = change_set.conversation
        await conversation.workspace_settled.wait()  # a run just canceled may still be being undone
        if not change_set.kept:
            settled = _note(conversation, "workspace_restored", change_set.name)
            if settled is None:
                return WorkspaceChanges(ref=change_set.ref, workspace="unchanged")
            return WorkspaceChanges(ref=change_set.ref, workspace=settled["workspace"], paths=list(settled.get("paths", [])))
        if self._snapshots is None:
            return WorkspaceChanges(ref=change_set.ref)
        # Read from the kept trees, not from a retained outcome: the same answer, and
        # one that outlives the outcome's retention.
        workspace = self._workspace(conversation)
        store = self._snapshot_store(workspace)

        def read() -> WorkspaceChanges | None:
            if not workspace_snapshot.has_change_set(store, change_set.name):
                return None
            return workspace_snapshot.SnapshotStore(Path(store), Path(workspace)).kept(change_set.name, change_set.ref)

        changes = await trio.to_thread.run_sync(read)
        if changes is None:
            return WorkspaceChanges(ref=change_set.ref, reverts=change_set.reverts)
        return msgspec.structs.replace(changes, reverts=change_set.reverts)

    def check_revertible(self, loc: Locator, ref: str) -> ChangeSet:
        change_set = self.find_change_set(loc, ref)
        if change_set.conversation.active is not None:
            raise GenerationInProgress(f"conversation {change_set.conversation.key[1]!r} has an active generation")
        return change_set

    async def revert_turn(self, change_set: ChangeSet, reason: str | None) -> WorkspaceChanges:
        """Put back every path the change set changed, if each is still as it left it
        (else RevertConflict, and nothing changes). The conversation's next run, and
        the next revert, wait for it."""
        conversation = change_set.conversation
        before, done = conversation.workspace_settled, trio.Event()
        conversation.workspace_settled = done
        revert = "rev_" + secrets.token_urlsafe(12)
        try:
            await before.wait()
            if self._snapshots is None:
                result: WorkspaceChanges | list[str] = WorkspaceChanges(ref=revert)
            else:
                workspace = self._workspace(conversation)
                store = self._snapshot_store(workspace)

                def work() -> WorkspaceChanges | list[str]:
                    if not workspace_snapshot.has_change_set(store, change_set.name):
                        return WorkspaceChanges(ref=revert)  # it changed nothing: nothing to put back
                    snapshots = workspace_snapshot.SnapshotStore.of(Path(store), Path(workspace), f"turns/{change_set.name}/before")
                    return snapshots.revert(change_set.name, revert, revert)

                with trio.CancelScope(shield=True):  # begun, a revert is seen through
                    result = await trio.to_thread.run_sync(work)
        finally:
            done.set()
        if isinstance(result, list):
            raise RevertConflict(change_set.ref, result)
        self._append(conversation, kind="note", event="turn_reverted",
                     data={"ref": change_set.ref, "revert": revert, "reason": reason, "paths": [f.path for f in result.files][:100],
                           "paths_total": result.files_total})
        event(log, "turn.reverted", ref=change_set.ref, revert=revert, conversation=conversation.key[1], paths=result.files_total)
        return msgspec.structs.replace(result, reverts=change_set.ref)

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
        if active.spec.events:
            self._notify(active.owner, progress)

    async def _drive(self, conversation: ConversationRecord, active: ActiveGeneration) -> None:
        """Run one generation to its end. Whatever goes wrong in here is this run's
        failure, never the daemon's: the run ends with a typed error and its worker is
        torn down; only a journal failure (the crash-only stop) goes further."""
        try:
            await self._run_generation(conversation, active)
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
        finally:
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
        if active.started_at is not None:
            fields["queue_ms"] = round(active.slot.waited_s * 1000, 1)
        report = handle.cleanup if handle is not None else None
        if report is not None:
            fields.update(pid=report.pid, ended_by=report.ended_by, cleanup="verified" if report.verified else "survivors",
                          leftovers_killed=len(report.leftovers_killed))
            if not report.verified:
                level = logging.ERROR
        else:
            fields["cleanup"] = "none"  # no process ran (in-process, or it never started)
        event(log, "run.finished", level, **fields)

    async def _run_generation(self, conversation: ConversationRecord, active: ActiveGeneration) -> None:
        """Wait for admission, run, settle; the slot is held until the worker is gone,
        so `max_active` bounds processes, not just runs."""
        with active.slot:
            with active.queue_scope:
                await active.slot.acquire()
                await conversation.workspace_settled.wait()  # the run before may still be undoing its changes
            if active.record.done.is_set():
                return  # canceled while queued
            self.telemetry.queue_wait_seconds.observe(active.slot.waited_s)
            settled = conversation.workspace_settled = trio.Event()
            active.started_at = time.perf_counter()
            assert active.spec.request is not None
            deadline = trio.current_time() + active.spec.request.timeout_ms / 1000 + self._deadline_grace_s
            active.handle = self._executor.start_run(
                active.encoded_spec, on_progress=lambda raw: self._on_progress(conversation, active, raw), deadline=deadline
            )
            try:
                await self._settle_when_done(conversation, active)
                await active.handle.cleaned_up.wait()
                self._observe_cleanup(active.handle)
                with trio.CancelScope(shield=True):  # a shutdown still undoes what its runs did
                    result, paths = await self._settle_workspace(conversation, active)
                if active.failure is not None and not active.record.done.is_set():
                    self._finish(conversation, active, error=self._with_workspace(active.failure, result, paths))
            finally:
                settled.set()

    async def _settle_workspace(self, conversation: ConversationRecord, active: ActiveGeneration) -> tuple[str, list[str]]:
        """Once the run's processes are gone (nothing writes any more): undo its changes
        to the workspace unless it completed (else keep them as its change set), and
        journal what became of it."""
        spec = active.spec
        if not self._changed_workspace(spec):
            return "unchanged", []  # no snapshot was needed
        assert spec.snapshot_store is not None and spec.workspace is not None
        settled = await self._settle_in_thread(spec.snapshot_store, spec.workspace, spec.run_id,
                                               completed=active.record.result is not None)
        if settled is None:
            return "unchanged", []
        self._record_workspace(conversation, spec.run_id, *settled)
        return settled

    async def _settle_in_thread(self, store: str, workspace: str, run_id: str, *, completed: bool) -> tuple[str, list[str]] | None:
        try:
            return await trio.to_thread.run_sync(lambda: workspace_snapshot.settle(store, workspace, run_id, completed=completed))
        except Exception as exc:  # noqa: BLE001 — a restore that fails is reported, never silent, never the daemon's end
            log.exception("settling the workspace of run %s failed", run_id)
            return "restore_failed", [f"{type(exc).__name__}: {exc}"]

    @staticmethod
    def _changed_workspace(spec: RunSpec) -> bool:
        """Whether the run took a snapshot (it made, or was about to make, a change)."""
        return spec.snapshot_store is not None and workspace_snapshot.has_snapshot(spec.snapshot_store, spec.run_id)

    def _with_workspace(self, error: ErrorInfo, result: str, paths: list[str]) -> ErrorInfo:
        """`error`, whose details say what became of the run's workspace."""
        if self._snapshots is None:
            return error  # runs are not transactions here
        details: dict[str, Any] = {**(error.details or {}), "workspace": result}
        if result == "restore_failed":
            details["workspace_paths"] = paths[:100]
        return msgspec.structs.replace(error, details=details)

    def _record_workspace(self, conversation: ConversationRecord, run_id: str, result: str, paths: list[str]) -> None:
        self._append(conversation, kind="note", event="workspace_restored",
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
            else:
                self._finish_failed(conversation, active, run_outcome.error)
        elif isinstance(outcome, Crashed):
            event(log, "worker.crashed", logging.WARNING, ref=active.record.ref, run_id=active.record.run_id, **outcome.details)
            self._finish_failed(conversation, active, LLMError("unknown", "generation worker crashed", details=outcome.details).info())
        elif isinstance(outcome, Broken):
            self._fail_run(conversation, active, "unknown", f"the worker broke the run protocol: {outcome.message}", "protocol_error")
        elif isinstance(outcome, DeadlineExceeded):
            assert active.spec.request is not None
            message = f"generation deadline passed ({active.spec.request.timeout_ms} ms + {self._deadline_grace_s * 1000:.0f} ms grace)"
            self._finish_failed(conversation, active, LLMError("timeout", message).info())
        elif isinstance(outcome, Unavailable):
            self._finish_failed(conversation, active, LLMError("unknown", f"no worker could run the generation: {outcome.message}").info())
        else:
            assert isinstance(outcome, Canceled)
            self._cancel(conversation, outcome.reason)

    def _fail_run(self, conversation: ConversationRecord, active: ActiveGeneration, category: LLMErrorCategory, message: str, reason: str,
                  *, at_once: bool = False) -> None:
        """End the run with an error the daemon found (not one the run reported), then
        tear its worker down: it may still be running. `at_once`: do not wait for its
        workspace to be settled (the daemon could not settle it)."""
        if not active.record.done.is_set():
            error = LLMError(category, message, retryable=False, details={"reason": reason}).info()
            if at_once:  # a workspace it changed is left as it is: say so
                result = "restore_failed" if self._changed_workspace(active.spec) else "unchanged"
                self._finish(conversation, active, error=self._with_workspace(active.failure or error, result, [message]))
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
        if self._changed_workspace(active.spec):
            active.failure = error
        else:
            self._finish(conversation, active, error=self._with_workspace(error, "unchanged", []))

    def _finish(self, conversation: ConversationRecord, active: ActiveGeneration, *, success: RunSucceeded | None = None, error: ErrorInfo | None = None) -> None:
        record = active.record
        if success is not None:
            for message in success.messages:
                self._append(conversation, kind="message", role=message.role, content=message.content, data=message.metadata)
            for artifact in success.artifacts:  # with the messages, in the same transaction
                self._append(conversation, kind="note", event="artifact_recorded",
                             data={"run_id": record.run_id, "ref": record.ref, "kind": artifact.kind, "data": artifact.data})
            record.result = success.result
            status = "completed"
        else:
            record.error = error
            status = "failed"
        self._append(conversation, kind="note", event="run_finished", data={"run_id": record.run_id, "status": status})
        self.telemetry.run_finished(
            active.spec.mode, _backend_label(active.spec), status, error.category if error else None, active.run_seconds()
        )
        self._settle(conversation, active, GenerationResult(ref=record.ref, result=record.result, error=record.error))

    def _cancel(self, conversation: ConversationRecord, reason: str) -> None:
        active = conversation.active
        assert active is not None
        record = active.record
        record.canceled = reason
        self._append(conversation, kind="note", event="cancel_requested", data={"reason": reason, "ref": record.ref})
        self._append(conversation, kind="note", event="run_finished", data={"run_id": record.run_id, "status": "canceled", "reason": reason})
        self.telemetry.run_finished(active.spec.mode, _backend_label(active.spec), "canceled", "canceled", active.run_seconds())
        self._settle(conversation, active, CanceledNote(ref=record.ref, reason=reason))
        if active.handle is not None:
            active.handle.cancel(reason)  # termination begins; it completes in the executor
        else:
            active.queue_scope.cancel()  # still waiting for admission: leave the queue

    def _settle(self, conversation: ConversationRecord, active: ActiveGeneration, note: Notification) -> None:
        self._close_record(active.record)
        conversation.active = None
        self._notify(active.owner, note)

    def _observe_cleanup(self, handle: RunHandle) -> None:
        report = handle.cleanup
        if report is None:
            return  # no process ran (in-process executor, or no worker was available)
        if not report.verified:
            self.telemetry.cleanup_failures.inc()
        if isinstance(handle.outcome, Canceled):
            self.telemetry.cancel_reaped_seconds.observe(report.reaped_after_ms / 1000)

    def _close_record(self, record: GenerationRecord) -> None:
        record.finished_at = time.time()
        record.done.set()
        outcome = StoredOutcome(result=record.result, error=record.error, canceled=record.canceled)
        self.journal.submit(GenerationFinished(record.ref, record.finished_at, outcome))

    async def _expire_outcomes(self) -> None:
        while True:
            await trio.sleep(max(1.0, self._retention_s / 10))
            horizon = time.time() - self._retention_s
            expired = [r for r, g in self._generations.items() if g.finished_at is not None and g.finished_at < horizon]
            for ref in expired:
                del self._generations[ref]
            if expired:
                self.journal.submit(ForgetGenerations(expired))

    def _snapshot_store(self, workspace: str) -> str:
        """The snapshots of a workspace: one store per workspace directory, whichever
        conversations use it."""
        assert self._snapshots is not None
        return str(self._snapshots / (hashlib.sha256(os.fsencode(os.path.realpath(workspace))).hexdigest()[:24] + ".git"))

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
        self.journal.submit(CreateConversation(key, metadata))
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
        self.journal.submit(AppendEntry(conversation.key, entry))


def _note(conversation: ConversationRecord, event: str, run_id: str) -> dict[str, Any] | None:
    """The data of the conversation's `event` note about run `run_id`, if any."""
    return next((e.data for e in conversation.journal if e.event == event and e.data.get("run_id") == run_id), None)


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


MAX_EXCLUDES = 256


def _conversation_metadata(value: Any) -> dict[str, Any]:
    """A conversation's metadata, with the keys the daemon reads checked: `workspace`
    (an absolute directory path) and `workspace_excludes` (gitignore-style patterns
    of paths its runs' snapshots neither capture nor restore)."""
    metadata = _metadata(value)
    workspace = metadata.get("workspace")
    if workspace is not None and not (isinstance(workspace, str) and os.path.isabs(workspace) and "\0" not in workspace):
        raise InvalidOptions("metadata.workspace", "must be an absolute path")
    excludes = metadata.get("workspace_excludes")
    if excludes is not None:
        if not isinstance(excludes, list) or len(excludes) > MAX_EXCLUDES:
            raise InvalidOptions("metadata.workspace_excludes", f"must be a list of at most {MAX_EXCLUDES} patterns")
        for pattern in excludes:
            if not (isinstance(pattern, str) and pattern.strip("/ ") and len(pattern) <= 1024
                    and not any(c in pattern for c in "\0\n\r")):
                raise InvalidOptions("metadata.workspace_excludes", f"{pattern!r} is not a path pattern (e.g. 'node_modules/')")
    return metadata


def _excludes(metadata: dict[str, Any]) -> list[str]:
    excludes = metadata.get("workspace_excludes")
    return [p for p in excludes if isinstance(p, str)] if isinstance(excludes, list) else []


def _check_limit(field: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise InvalidOptions(field, "must be >= 0")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"


def _backend_label(spec: RunSpec) -> str:
    return spec.request.backend.name if spec.request is not None else "unknown"


def _run_fields(conversation: ConversationRecord, active: ActiveGeneration) -> dict[str, Any]:
    project, id_ = conversation.key
    fields: dict[str, Any] = {"ref": active.record.ref, "run_id": active.record.run_id, "conversation": id_}
    if project is not None:
        fields["project"] = project
    fields.update(mode=active.spec.mode, backend=_backend_label(active.spec))
    return fields
