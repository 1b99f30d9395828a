"""The durable store: SQLite in WAL mode, one file in the state dir.

Every call blocks; the `DurableLog` makes them from a worker thread, one at a time
(hence `check_same_thread=False`: calls move between threads, never overlap).

    conversations(rowid, project, id, metadata)     project '' stands for None
    entries(conversation, seq, body)                 body: a msgpack JournalEntry
    generations(ref, conversation, run_id, finished_at, outcome)
    events(ref, first_seq, last_seq, frames)         frames: a msgpack list of encoded events
    pauses(ref, body)                                a generation waiting for approvals

`synchronous=NORMAL` (the default) makes a commit survive a crash of the daemon, the
case that matters here; `FULL` adds an fsync per batch, for power loss too.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path

import msgspec

from genvisor.daemon.pidlock import LockHeld, lock_exclusively
from genvisor.daemon.store import (
    AppendEntry,
    ConversationKey,
    CreateConversation,
    ForgetGenerations,
    GenerationEvents,
    GenerationFinished,
    GenerationPaused,
    GenerationResumed,
    GenerationStarted,
    Snapshot,
    StoredConversation,
    StoredGeneration,
    StoredOutcome,
    StoreFailed,
    Write,
    within,
)
from genvisor.types import JournalEntry

SCHEMA_VERSION = 2  # 2: events, pauses

_SCHEMA = """
CREATE TABLE IF NOT EXISTS conversations (
    rowid INTEGER PRIMARY KEY,
    project TEXT NOT NULL,
    id TEXT NOT NULL,
    metadata BLOB NOT NULL,
    UNIQUE (project, id)
);
CREATE TABLE IF NOT EXISTS entries (
    conversation INTEGER NOT NULL REFERENCES conversations(rowid),
    seq INTEGER NOT NULL,
    body BLOB NOT NULL,
    PRIMARY KEY (conversation, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS generations (
    ref TEXT PRIMARY KEY,
    conversation INTEGER NOT NULL REFERENCES conversations(rowid),
    run_id TEXT NOT NULL,
    finished_at REAL,
    outcome BLOB
);
CREATE TABLE IF NOT EXISTS pauses (
    ref TEXT PRIMARY KEY,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    ref TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    frames BLOB NOT NULL,
    PRIMARY KEY (ref, first_seq)
) WITHOUT ROWID;
"""

_encode = msgspec.msgpack.Encoder().encode
_decode_entry = msgspec.msgpack.Decoder(JournalEntry).decode
_decode_outcome = msgspec.msgpack.Decoder(StoredOutcome).decode
_decode_metadata = msgspec.msgpack.Decoder(dict).decode
_decode_frames = msgspec.msgpack.Decoder(list[bytes]).decode


class SqliteStore:
    blocking = True

    def __init__(self, path: Path, *, synchronous: str = "NORMAL") -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # One daemon per journal: two writers would each believe their memory is the truth.
            self._lock = lock_exclusively(path.with_name(path.name + ".lock"))
        except LockHeld as held:
            raise StoreFailed(f"the journal is in use by another genvisor daemon (pid {held.holder}): {path}") from None
        except OSError as exc:
            raise StoreFailed(f"cannot use the state dir {path.parent}: {exc.strerror or exc}") from None
        old_umask = os.umask(0o077)  # the journal holds conversations: owner only
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            os.close(self._lock)
            raise StoreFailed(f"cannot open the journal {path}: {exc}") from exc
        finally:
            os.umask(old_umask)
        self.path = path
        self._rowids: dict[ConversationKey, int] = {}
        self._reader: sqlite3.Connection | None = None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreFailed(f"{path} has journal schema {version}; this genvisor knows up to {SCHEMA_VERSION}")
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            # Events are read while the writer thread writes: WAL lets a second
            # connection read the last commit meanwhile; reads take turns on it.
            self._reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._reading = threading.Lock()
        except sqlite3.Error as exc:
            self.close()
            raise StoreFailed(f"cannot open the journal {path}: {exc}") from exc

    def load(self, *, retained_since: float) -> Snapshot:
        try:
            return self._load(retained_since)
        except (sqlite3.Error, msgspec.DecodeError) as exc:
            raise StoreFailed(f"cannot read the journal {self.path}: {exc} (it is damaged; restore it from a backup, "
                              "or move it aside to start with an empty journal)") from exc

    def _load(self, retained_since: float) -> Snapshot:
        keys: dict[int, ConversationKey] = {}
        conversations: dict[int, StoredConversation] = {}
        for rowid, project, id_, metadata in self._db.execute("SELECT rowid, project, id, metadata FROM conversations"):
            key = (project or None, id_)
            keys[rowid] = key
            self._rowids[key] = rowid
            conversations[rowid] = StoredConversation(key, _decode_metadata(metadata), [])
        for rowid, body in self._db.execute("SELECT conversation, body FROM entries ORDER BY conversation, seq"):
            conversations[rowid].entries.append(_decode_entry(body))
        self._db.execute("DELETE FROM generations WHERE finished_at < ?", (retained_since,))
        self._db.execute("DELETE FROM events WHERE ref NOT IN (SELECT ref FROM generations)")
        self._db.execute("DELETE FROM pauses WHERE ref NOT IN (SELECT ref FROM generations)")
        generations = [
            StoredGeneration(ref, keys[rowid], run_id, finished_at, _decode_outcome(outcome) if outcome is not None else None,
                             last_seq or 0, pause)
            for ref, rowid, run_id, finished_at, outcome, last_seq, pause in self._db.execute(
                "SELECT ref, conversation, run_id, finished_at, outcome, "
                "(SELECT MAX(last_seq) FROM events WHERE events.ref = generations.ref), "
                "(SELECT body FROM pauses WHERE pauses.ref = generations.ref) FROM generations"
            )
        ]
        return Snapshot(list(conversations.values()), generations)

    def read_events(self, ref: str, after_seq: int, max_bytes: int) -> list[bytes]:
        assert self._reader is not None
        frames: list[bytes] = []
        size = 0
        try:
            with self._reading:
                rows = self._reader.execute(
                    "SELECT first_seq, frames FROM events WHERE ref = ? AND last_seq > ? ORDER BY first_seq", (ref, after_seq)
                )
                for first_seq, body in rows:
                    batch = _decode_frames(body)[max(0, after_seq + 1 - first_seq):]
                    frames.extend(batch)
                    size += sum(map(len, batch))
                    if size >= max_bytes:
                        break
                if not frames:  # none after it: the last one
                    row = self._reader.execute("SELECT frames FROM events WHERE ref = ? ORDER BY first_seq DESC LIMIT 1",
                                               (ref,)).fetchone()
                    frames = _decode_frames(row[0])[-1:] if row else []
        except (sqlite3.Error, msgspec.DecodeError) as exc:
            raise StoreFailed(f"cannot read the journal {self.path}: {exc}") from exc
        return within(frames, max_bytes)

    def write(self, batch: list[Write]) -> None:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for write in batch:
                    self._apply(write)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreFailed(f"journal write failed ({self.path}): {exc}") from exc

    def describe(self) -> str:
        return f"sqlite:{self.path}"

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._db.close()
        os.close(self._lock)  # and with it the lock

    def _apply(self, write: Write) -> None:
        db = self._db
        if isinstance(write, AppendEntry):
            db.execute(
                "INSERT INTO entries (conversation, seq, body) VALUES (?, ?, ?)",
                (self._rowids[write.key], write.entry.seq, _encode(write.entry)),
            )
        elif isinstance(write, CreateConversation):
            project, id_ = write.key
            cursor = db.execute(
                "INSERT INTO conversations (project, id, metadata) VALUES (?, ?, ?)", (project or "", id_, _encode(write.metadata))
            )
            assert cursor.lastrowid is not None  # set by the INSERT
            self._rowids[write.key] = cursor.lastrowid
        elif isinstance(write, GenerationStarted):
            db.execute(
                "INSERT INTO generations (ref, conversation, run_id) VALUES (?, ?, ?)", (write.ref, self._rowids[write.key], write.run_id)
            )
        elif isinstance(write, GenerationEvents):
            db.execute(
                "INSERT INTO events (ref, first_seq, last_seq, frames) VALUES (?, ?, ?, ?)",
                (write.ref, write.first_seq, write.first_seq + len(write.frames) - 1, _encode(write.frames)),
            )
        elif isinstance(write, GenerationPaused):
            db.execute("INSERT OR REPLACE INTO pauses (ref, body) VALUES (?, ?)", (write.ref, write.pause))
        elif isinstance(write, GenerationResumed):
            db.execute("DELETE FROM pauses WHERE ref = ?", (write.ref,))
        elif isinstance(write, GenerationFinished):
            db.execute("DELETE FROM pauses WHERE ref = ?", (write.ref,))
            db.execute(
                "UPDATE generations SET finished_at = ?, outcome = ? WHERE ref = ?", (write.finished_at, _encode(write.outcome), write.ref)
            )
        else:
            assert isinstance(write, ForgetGenerations)
            db.executemany("DELETE FROM generations WHERE ref = ?", [(ref,) for ref in write.refs])
            db.executemany("DELETE FROM events WHERE ref = ?", [(ref,) for ref in write.refs])
            db.executemany("DELETE FROM pauses WHERE ref = ?", [(ref,) for ref in write.refs])
