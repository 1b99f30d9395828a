"""Admission: at most `max_active` runs at once, at most `max_queued` more waiting.

`admit()` decides synchronously, so a caller refused with `Overloaded` has changed
nothing. An admitted caller holds a `Slot`; `acquire()` waits for its turn (FIFO),
`release()` hands the turn to the next in line. A slot is released exactly once,
whether it ran, was cancelled in the queue, or never waited at all.
"""

from __future__ import annotations

import collections
import time

import trio

from genvisor.errors import Overloaded


class Slot:
    def __init__(self, admission: Admission, granted: bool) -> None:
        self._admission = admission
        self._turn = trio.Event()
        self._released = False
        self.queued_at = time.perf_counter()
        self.waited_s = 0.0
        if granted:
            self._turn.set()

    async def acquire(self) -> None:
        """Wait for this slot's turn. Cancelled while queued: it leaves the queue."""
        await self._turn.wait()
        self.waited_s = time.perf_counter() - self.queued_at

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._admission._release(self)

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


class Admission:
    def __init__(self, *, max_active: int, max_queued: int) -> None:
        if max_active < 1 or max_queued < 0:
            raise ValueError("max_active must be >= 1 and max_queued >= 0")
        self.max_active = max_active
        self.max_queued = max_queued
        self.active = 0
        self._queue: collections.deque[Slot] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._queue)

    def admit(self, *, beyond_queue: bool = False) -> Slot:
        """A slot, or `Overloaded` when `max_queued` wait already (`beyond_queue`: a run
        admitted before, going on after a pause, waits all the same)."""
        if self.active < self.max_active and not self._queue:
            self.active += 1
            return Slot(self, granted=True)
        if len(self._queue) >= self.max_queued and not beyond_queue:
            raise Overloaded(
                f"admission queue full ({self.active} runs active, {len(self._queue)} queued); retry later"
            )
        slot = Slot(self, granted=False)
        self._queue.append(slot)
        return slot

    def _release(self, slot: Slot) -> None:
        if not slot._turn.is_set():
            self._queue.remove(slot)  # it never ran: just leave the line
            return
        if self._queue:
            self._queue.popleft()._turn.set()  # the turn passes on; `active` is unchanged
        else:
            self.active -= 1
