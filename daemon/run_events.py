"""Every run's events, kept for `stream_events`: live in memory, durable in the journal.

A run's events are frames (the msgpack of each `GenerationEvent`, as its worker sent
it), numbered from 1, the terminal event the daemon appends last. While the run is
active its `RunEvents` holds the frames not yet durable plus the last second's; once a
second the new ones are journaled as one write per run, and what is durable leaves
memory, so an active run costs about a second of its events and an ended one nothing.
A reader is served from memory, or from the journal for what left it (also after a
restart: a killed daemon loses at most the last second of its runs' events).
"""

from __future__ import annotations

import logging

import msgspec
import trio

from genvisor.daemon.durable import DurableLog
from genvisor.daemon.store import GenerationEvents, within
from genvisor.ipc.frames import RawEventBatch
from genvisor.types import GenerationEvent

log = logging.getLogger("genvisor.daemon")

JOURNAL_INTERVAL_S = 1.0  # how much of its runs' events a killed daemon may lose
BATCH_BYTES = 1024 * 1024  # of events in one `stream_events` answer (at least one event)

_encoder = msgspec.msgpack.Encoder()


class RunEvents:
    """One run's event frames: `frames[i]` has seq `base + i`."""

    def __init__(self, ref: str, last_seq: int = 0) -> None:
        self.ref = ref
        self.base = last_seq + 1
        self.frames: list[bytes] = []
        self.unjournaled = last_seq + 1  # the first seq not yet submitted to the journal
        self.ended = False
        self.ended_ticket = 0  # the journal write that holds the terminal event
        self._grew: trio.Event | None = None

    @property
    def last_seq(self) -> int:
        return self.base + len(self.frames) - 1

    def append(self, frame: bytes) -> int:
        self.frames.append(frame)
        if self._grew is not None:
            self._grew.set()
            self._grew = None
        return self.last_seq

    def take_unjournaled(self) -> GenerationEvents | None:
        if self.unjournaled > self.last_seq:
            return None
        write = GenerationEvents(self.ref, self.unjournaled, self.frames[self.unjournaled - self.base:])
        self.unjournaled = self.last_seq + 1
        return write

    def release_through(self, seq: int) -> None:
        """Forget the frames through `seq`: they are durable."""
        if seq >= self.base:
            del self.frames[: seq - self.base + 1]
            self.base = seq + 1

    def after(self, after_seq: int) -> list[bytes]:
        return within(self.frames[max(0, after_seq + 1 - self.base):], BATCH_BYTES)

    async def wait_past(self, seq: int) -> None:
        while self.last_seq <= seq and not self.ended:
            if self._grew is None:
                self._grew = trio.Event()
            await self._grew.wait()


class EventStreams:
    """The runs' event logs, their journaling, and reading them back."""

    def __init__(self, journal: DurableLog) -> None:
        self._journal = journal
        self._live: dict[str, RunEvents] = {}

    def open(self, ref: str, last_seq: int = 0) -> RunEvents:
        """The log of run `ref`, whose stored events end at `last_seq`."""
        events = self._live[ref] = RunEvents(ref, last_seq)
        return events

    def end(self, events: RunEvents, terminal: GenerationEvent) -> bytes:
        """Append the run's terminal event (numbered next) and submit what is not yet
        journaled; submit the run's outcome right after, in the same step, so that they
        are durable together. Returns the terminal event's frame."""
        frame = _encoder.encode(msgspec.structs.replace(terminal, seq=events.last_seq + 1))
        events.append(frame)
        events.ended = True
        self._submit(events)
        events.ended_ticket = self._journal.submitted
        return frame

    def _submit(self, events: RunEvents) -> None:
        write = events.take_unjournaled()
        if write is not None:
            self._journal.submit(write)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Once a second: journal the live runs' new events, then let what is durable
        leave memory (an ended run's log goes whole)."""
        task_status.started()
        while True:
            await trio.sleep(JOURNAL_INTERVAL_S)
            submitted = []
            for events in self._live.values():
                if not events.ended:
                    self._submit(events)
                    submitted.append((events, events.unjournaled - 1))
            await self._journal.wait_durable(self._journal.submitted)
            for events, seq in submitted:
                events.release_through(seq)
            durable = self._journal.durable
            for ref in [ref for ref, events in self._live.items() if events.ended and events.ended_ticket <= durable]:
                del self._live[ref]

    async def read(self, ref: str, after_seq: int, wait_s: float) -> RawEventBatch:
        """Run `ref`'s events after `after_seq` (as many as fit in a batch), waiting up
        to `wait_s` for one if there is none yet. The terminal event always ends a
        stream: asked for events past it, the answer is the terminal event alone."""
        events = self._live.get(ref)
        if events is None or after_seq + 1 < events.base:
            frames = await self._read_stored(ref, after_seq)
            if events is None:  # the run has ended: its events are all stored
                return RawEventBatch(_raw(frames), ended=not frames or _terminal(frames[-1]))
            if frames:  # after_seq + 1 … on, durable (what left memory, or what a killed daemon journaled)
                return RawEventBatch(_raw(frames), ended=events.ended and after_seq + len(frames) == events.last_seq)
        with trio.move_on_after(wait_s):
            await events.wait_past(after_seq)
        first = max(after_seq + 1, events.base)
        frames = events.after(after_seq)
        if not frames and events.ended:
            frames, first = events.frames[-1:], events.last_seq
        return RawEventBatch(_raw(frames), ended=events.ended and first + len(frames) - 1 == events.last_seq)

    async def _read_stored(self, ref: str, after_seq: int) -> list[bytes]:
        store = self._journal.store
        if store.blocking:
            return await trio.to_thread.run_sync(store.read_events, ref, after_seq, BATCH_BYTES)
        return store.read_events(ref, after_seq, BATCH_BYTES)


_terminal_decoder = msgspec.msgpack.Decoder(GenerationEvent)


def _terminal(frame: bytes) -> bool:
    return _terminal_decoder.decode(frame).terminal


def _raw(frames: list[bytes]) -> list[msgspec.Raw]:
    return [msgspec.Raw(frame) for frame in frames]
