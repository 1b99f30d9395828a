"""A daemon's conversations: their journals, of which this is the only writer, and the
commands that change or read them. Every command changes its conversation
synchronously (no await between a check and its write), so commands to one
conversation take effect strictly in the order they arrive.

Cancelling a conversation's active run (a forced mode switch, `stop_conversation`) is
the generations' business: it is handed in as `cancel_active`.
"""

from __future__ import annotations

import collections
import os
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from genvisor.daemon.durable import DurableLog
from genvisor.daemon.store import AppendEntry, CreateConversation, StoredConversation
from genvisor.errors import (
    AlreadyStarted,
    Diagnostic,
    EmptyMessage,
    ForceCancelReasonRequired,
    GenerationInProgress,
    InvalidLocator,
    InvalidModeConfig,
    InvalidOptions,
    NotFound,
    RunInProgress,
    UnsupportedMode,
)
from genvisor.modes.assemble import context_window, transport_keys
from genvisor.modes.conversation import apply, initial_state
from genvisor.modes.planning import plans_in
from genvisor.modes.registry import registry
from genvisor.types import (
    ROLES,
    ContextMessage,
    Conversation,
    DerivedState,
    JournalEntry,
    Locator,
    Message,
    PlanRecord,
    TimelineEntry,
)

if TYPE_CHECKING:
    from genvisor.daemon.generations import ActiveGeneration, Pending

ConversationKey = tuple[str | None, str]


class ConversationRecord:
    def __init__(self, key: ConversationKey, metadata: dict[str, Any]) -> None:
        self.key = key
        self.metadata = metadata
        self.journal: list[JournalEntry] = []
        self.state = initial_state()
        self.active: ActiveGeneration | None = None
        self.queue: collections.deque[Pending] = collections.deque()  # `multitask="enqueue"`: to start in order
        # Set while no run's workspace is still to be settled (undone, or let go), and
        # no revert is under way: the next run starts only then, so it never sees a
        # half-undone workspace.
        self.workspace_settled = trio.Event()
        self.workspace_settled.set()

    def view(self) -> Conversation:
        return Conversation(id=self.key[1], project_id=self.key[0], metadata=self.metadata, state=self.state)


class Conversations:
    def __init__(self, journal: DurableLog, cancel_active: Callable[[ConversationRecord, str], None]) -> None:
        self._journal = journal
        self._cancel_active = cancel_active
        self._conversations: dict[ConversationKey, ConversationRecord] = {}

    def restore(self, stored: list[StoredConversation]) -> None:
        """Take back the conversations the store holds (once, before serving)."""
        for kept in stored:
            conversation = ConversationRecord(kept.key, kept.metadata)
            conversation.journal = kept.entries
            for entry in kept.entries:
                conversation.state = apply(conversation.state, entry)
            self._conversations[kept.key] = conversation

    def __len__(self) -> int:
        return len(self._conversations)

    def __iter__(self):
        return iter(list(self._conversations.values()))

    def get(self, key: ConversationKey) -> ConversationRecord | None:
        return self._conversations.get(key)

    def of(self, key: ConversationKey) -> ConversationRecord:
        return self._conversations[key]

    def start_conversation(self, id: str, project_id: str | None, metadata: Any) -> Conversation:
        key = key_of(Locator(project_id, id))
        checked = conversation_metadata(metadata)
        if key in self._conversations:
            raise AlreadyStarted(f"conversation {id!r} already exists")
        return self.create(key, checked).view()

    def ensure_conversation(self, id: str, project_id: str | None, metadata: Any) -> tuple[Conversation, str]:
        key = key_of(Locator(project_id, id))
        checked = conversation_metadata(metadata)
        existing = self.get(key)
        if existing is not None:
            return existing.view(), "existing"
        return self.create(key, checked).view(), "started"

    def conversation(self, loc: Locator) -> Conversation:
        return self.fetch(loc).view()

    def derived_state(self, loc: Locator) -> DerivedState:
        return self.fetch(loc).state

    def conversation_messages(self, loc: Locator, max_messages: int | None, roles: list[Any] | None) -> list[Message]:
        messages = self.fetch(loc).state.messages
        check_limit("max_messages", max_messages)
        if roles is not None:
            wanted = {r for r in roles if isinstance(r, str) and r in ROLES}
            messages = [m for m in messages if m.role in wanted]
        return messages[-max_messages:] if max_messages else ([] if max_messages == 0 else list(messages))

    def conversation_llm_context(self, loc: Locator, max_messages: int, include_system: bool, include_tool: bool) -> list[ContextMessage]:
        state = self.fetch(loc).state
        check_limit("max_messages", max_messages)
        return context_window(state.messages, max_messages, include_system, include_tool)

    def conversation_timeline(self, loc: Locator) -> list[TimelineEntry]:
        return [
            TimelineEntry(e.seq, e.at, "message" if e.kind == "message" else "event", e.role, e.content, e.event, e.data)
            for e in self.fetch(loc).journal
        ]

    def plans(self, loc: Locator) -> list[PlanRecord]:
        """The plans the conversation's `planning` turns committed, oldest first."""
        return plans_in(self.fetch(loc).journal)

    def conversation_thread_entries(self, loc: Locator) -> list[JournalEntry]:
        return list(self.fetch(loc).journal)

    def send_user_message(self, loc: Locator, content: str, metadata: Any) -> Conversation:
        return self._record_message(loc, "user", content, metadata)

    def record_assistant_message(self, loc: Locator, content: str, metadata: Any) -> Conversation:
        return self._record_message(loc, "assistant", content, metadata)

    def configure_llm(self, loc: Locator, backend: str | None, provider: str | None, model: str | None, options: Any) -> Conversation:
        key = key_of(loc)
        if options is not None and not isinstance(options, dict):
            raise InvalidOptions("options", "must be a mapping")
        if named := transport_keys(options or {}):
            raise InvalidOptions(f"options.{named[0]}", "where and how a request travels is the daemon config's, not a client's")
        conversation = self.writable(key)
        self.append(conversation, kind="note", event="llm_configured",
                    data={"backend": backend, "provider": provider, "model": model, "options": options or {}})
        return conversation.view()

    def configure_skills(self, loc: Locator, enabled: list[Any]) -> Conversation:
        conversation = self.writable(key_of(loc))
        skills: list[str] = []
        for skill in enabled:
            if isinstance(skill, str) and skill.strip() and skill.strip() not in skills:
                skills.append(skill.strip())
        self.append(conversation, kind="note", event="skills_configured", data={"skills": skills})
        return conversation.view()

    def stop_conversation(self, loc: Locator) -> None:
        """Cancel the active generation with reason "conversation_stopped" (the owner
        gets GenerationCanceled). The conversation's journal stays: it is its state."""
        conversation = self.fetch(loc)
        if conversation.active is not None:
            self._cancel_active(conversation, "conversation_stopped")

    # ---- modes -------------------------------------------------------------------------

    def mode(self, loc: Locator) -> str:
        return self.fetch(loc).state.mode

    def configure_mode(
        self, loc: Locator, mode: str, mode_state: Any, *, reason: str | None, force: bool, cancel_reason: str | None, cause_id: str | None
    ) -> Conversation:
        key = key_of(loc)
        conversation = self.get(key) or self.create(key, {})
        modes = registry()
        note = {"mode": mode, "from": conversation.state.mode, "reason": reason, "cause_id": cause_id}

        def reject(error: Exception) -> Exception:
            self.append(conversation, kind="note", event="mode_switch_rejected", data={**note, "error": type(error).__name__})
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
            self._cancel_active(conversation, cancel_reason)
        event = "mode_configured" if mode == conversation.state.mode else "mode_switch_accepted"
        self.append(conversation, kind="note", event=event, data={**note, "mode_state": mode_state or {}, "forced": force})
        return conversation.view()

    # ---- the journal ------------------------------------------------------------------

    def _record_message(self, loc: Locator, role: str, content: str, metadata: Any) -> Conversation:
        key = key_of(loc)
        checked = checked_message(content, metadata)
        conversation = self.writable(key)
        self.append(conversation, kind="message", role=role, content=content, data=checked)
        return conversation.view()

    def writable(self, key: ConversationKey) -> ConversationRecord:
        """The conversation to change (created on first use), unless a run is active."""
        conversation = self.get(key)
        if conversation is not None and conversation.active is not None:
            raise GenerationInProgress(f"conversation {key[1]!r} has an active generation")
        return conversation or self.create(key, {})

    def create(self, key: ConversationKey, metadata: dict[str, Any]) -> ConversationRecord:
        if key[0] is not None:
            metadata = {**metadata, "project_id": key[0]}
        conversation = ConversationRecord(key, metadata)
        self._conversations[key] = conversation
        self._journal.submit(CreateConversation(key, metadata))
        return conversation

    def fetch(self, loc: Locator) -> ConversationRecord:
        key = key_of(loc)
        conversation = self.get(key)
        if conversation is None:
            raise NotFound(f"no conversation {key[1]!r}" + (f" in project {key[0]!r}" if key[0] is not None else ""))
        return conversation

    def append(self, conversation: ConversationRecord, **fields: Any) -> None:
        seq = len(conversation.journal) + 1
        entry = JournalEntry(entry_id=f"e{seq}_{secrets.token_hex(4)}", seq=seq, at=time.time(), **fields)
        conversation.journal.append(entry)
        conversation.state = apply(conversation.state, entry)
        self._journal.submit(AppendEntry(conversation.key, entry))



def note(conversation: ConversationRecord, event: str, run_id: str) -> dict[str, Any] | None:
    """The data of the conversation's `event` note about run `run_id`, if any."""
    return next((e.data for e in conversation.journal if e.event == event and e.data.get("run_id") == run_id), None)


def key_of(loc: Locator) -> ConversationKey:
    """The key of the conversation `loc` names (InvalidLocator if it names none)."""
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


def conversation_metadata(value: Any) -> dict[str, Any]:
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


def checked_message(content: str, metadata: Any) -> dict[str, Any]:
    """A message's metadata, once its content and metadata are checked."""
    if not content.strip():
        raise EmptyMessage("message content is blank")
    return _metadata(metadata, field="metadata")


def check_limit(field: str, value: int | None) -> None:
    if value is not None and value < 0:
        raise InvalidOptions(field, "must be >= 0")
