"""Group commit: the runtime's writes, in order, made durable in batches off the loop.

The runtime submits writes synchronously as it changes state, so the order of the
store is the order of the runtime. A single task takes everything pending and applies
it as one transaction in a worker thread; anything submitted meanwhile forms the next
batch. Because a runtime step never awaits between its writes, the task can only run
between steps, so a batch never splits a step.

Replies wait for durability, not the runtime: the front tags each outgoing frame with
`submitted` at the moment it is queued and holds it until `durable` has caught up,
so no client is told of a change a crash could still take back.
"""

from __future__ import annotations

import trio

from genvisor.daemon.store import Store, StoreFailed, Write


class DurableLog:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.submitted = 0  # writes submitted so far
        self.durable = 0  # of those, how many are durable
        self.batches = 0
        self._pending: list[Write] = []
        self._wakeup = trio.Event()
        self._progress = trio.Event()
        self._failure: StoreFailed | None = None

    def submit(self, write: Write) -> None:
        if self._failure is not None:
            raise self._failure
        self.submitted += 1
        if not self.store.blocking:  # an in-memory store: durable on return
            self.store.write([write])
            self.durable = self.submitted
            return
        self._pending.append(write)
        self._wakeup.set()

    async def wait_durable(self, ticket: int) -> None:
        """Return once the first `ticket` writes are durable."""
        while self.durable < ticket:
            if self._failure is not None:
                raise self._failure
            await self._progress.wait()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                await self._commit()
        finally:
            # Cancelled (shutdown): what is pending is the last thing the daemon did.
            with trio.CancelScope(shield=True):
                if self._pending and self._failure is None:
                    await self._commit()

    async def _commit(self) -> None:
        batch, self._pending = self._pending, []
        try:
            await trio.to_thread.run_sync(self.store.write, batch)
        except StoreFailed as exc:
            self._failure = exc
            raise
        else:
            self.durable += len(batch)
            self.batches += 1
        finally:
            progress, self._progress = self._progress, trio.Event()
            progress.set()
