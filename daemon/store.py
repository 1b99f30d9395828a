"""The journal store: what the runtime writes, and what it reads back after a restart.

The runtime keeps every conversation in memory and is its only writer; the store is
where its changes become durable. Changes are `Write` values, applied in order, in
batches: one batch is one transaction, and a batch never splits what one runtime step
wrote (a turn's commit — its messages and `run_finished` — lands whole or not at all).

Two stores share the interface: `MemoryStore` (tests and embedding: nothing to wait
for) and `SqliteStore` (the daemon's default; its calls block, so the `DurableLog`
runs them in a thread).
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from genvisor.errors import ErrorInfo
from genvisor.types import JournalEntry, LLMResult

ConversationKey = tuple[str | None, str]


# ---- what is written ---------------------------------------------------------------


class CreateConversation(msgspec.Struct, frozen=True):
    key: ConversationKey
    metadata: dict


class AppendEntry(msgspec.Struct, frozen=True):
    key: ConversationKey
    entry: JournalEntry


class StoredOutcome(msgspec.Struct, frozen=True):
    """A generation's settled outcome: exactly one of the three is set."""

    result: LLMResult | None = None
    error: ErrorInfo | None = None
    canceled: str | None = None


class GenerationStarted(msgspec.Struct, frozen=True):
    ref: str
    key: ConversationKey
    run_id: str


class GenerationFinished(msgspec.Struct, frozen=True):
    ref: str
    finished_at: float  # wall clock: retention must survive a restart
    outcome: StoredOutcome


class GenerationEvents(msgspec.Struct, frozen=True):
    """Events `first_seq` … `first_seq + len(frames) - 1` of a generation, each as the
    msgpack of its `GenerationEvent`."""

    ref: str
    first_seq: int
    frames: list[bytes]


class GenerationPaused(msgspec.Struct, frozen=True):
    """A generation waits for approvals: what it needs to go on (the daemon's encoding),
    replacing what an earlier write of it said."""

    ref: str
    pause: bytes


class GenerationResumed(msgspec.Struct, frozen=True):
    ref: str


class ForgetGenerations(msgspec.Struct, frozen=True):
    refs: list[str]


Write = (CreateConversation | AppendEntry | GenerationStarted | GenerationEvents | GenerationPaused | GenerationResumed
         | GenerationFinished | ForgetGenerations)


# ---- what is read back --------------------------------------------------------------


class StoredConversation(msgspec.Struct):
    key: ConversationKey
    metadata: dict
    entries: list[JournalEntry]


class StoredGeneration(msgspec.Struct):
    ref: str
    key: ConversationKey
    run_id: str
    finished_at: float | None  # None: it was running when the daemon stopped
    outcome: StoredOutcome | None
    last_seq: int = 0  # of its events, the last one stored
    pause: bytes | None = None  # it waits for approvals (see GenerationPaused)


class Snapshot(msgspec.Struct):
    conversations: list[StoredConversation]
    generations: list[StoredGeneration]


class Store(Protocol):
    blocking: bool  # True: call only from a thread, never on the Trio loop

    def load(self, *, retained_since: float) -> Snapshot:
        """Everything stored, minus generations that finished before `retained_since`."""

    def write(self, batch: list[Write]) -> None:
        """Apply `batch` in order, atomically."""

    def read_events(self, ref: str, after_seq: int, max_bytes: int) -> list[bytes]:
        """Generation `ref`'s stored events after `after_seq`, in order, as many as fit
        in `max_bytes` (at least one); none after it: its last one (none stored: []).
        May be called while `write` runs in another thread."""

    def describe(self) -> str: ...

    def close(self) -> None: ...


class StoreFailed(Exception):
    """The store could not make a change durable. The daemon stops: what it holds in
    memory is ahead of the disk, and a restart recovers from the last durable state."""


class MemoryStore:
    """The store of an embedded runtime and of tests: durable for the life of the
    object, so a second runtime over the same store sees what the first wrote."""

    blocking = False

    def __init__(self) -> None:
        self._conversations: dict[ConversationKey, StoredConversation] = {}
        self._generations: dict[str, StoredGeneration] = {}
        self._events: dict[str, list[bytes]] = {}

    def load(self, *, retained_since: float) -> Snapshot:
        generations = [g for g in self._generations.values() if g.finished_at is None or g.finished_at >= retained_since]
        return Snapshot(
            conversations=[StoredConversation(c.key, dict(c.metadata), list(c.entries)) for c in self._conversations.values()],
            generations=[msgspec.structs.replace(g, last_seq=len(self._events.get(g.ref, ()))) for g in generations],
        )

    def write(self, batch: list[Write]) -> None:
        for write in batch:
            if isinstance(write, CreateConversation):
                self._conversations[write.key] = StoredConversation(write.key, write.metadata, [])
            elif isinstance(write, AppendEntry):
                self._conversations[write.key].entries.append(write.entry)
            elif isinstance(write, GenerationStarted):
                self._generations[write.ref] = StoredGeneration(write.ref, write.key, write.run_id, None, None)
            elif isinstance(write, GenerationEvents):
                events = self._events.setdefault(write.ref, [])
                assert len(events) + 1 == write.first_seq, "events are stored in order, once"
                events.extend(write.frames)
            elif isinstance(write, GenerationPaused):
                self._generations[write.ref].pause = write.pause
            elif isinstance(write, GenerationResumed):
                self._generations[write.ref].pause = None
            elif isinstance(write, GenerationFinished):
                generation = self._generations[write.ref]
                generation.finished_at, generation.outcome, generation.pause = write.finished_at, write.outcome, None
            else:
                for ref in write.refs:
                    self._generations.pop(ref, None)
                    self._events.pop(ref, None)

    def read_events(self, ref: str, after_seq: int, max_bytes: int) -> list[bytes]:
        events = self._events.get(ref, [])
        return within(events[after_seq:] or events[-1:], max_bytes)

    def describe(self) -> str:
        return "memory"

    def close(self) -> None:
        pass


def within(frames: list[bytes], max_bytes: int) -> list[bytes]:
    """The first of `frames` that fit in `max_bytes` together; at least one."""
    size = 0
    for count, frame in enumerate(frames):
        size += len(frame)
        if size > max_bytes and count:
            return frames[:count]
    return frames
