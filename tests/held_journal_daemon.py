"""`python tests/held_journal_daemon.py serve …`: the real daemon, `genvisor serve` and
nothing else changed, but for one journal write it holds: the batch that appends a
user message whose content is $GENVISOR_TEST_HOLD is never committed. Once that batch
has reached the store, the file $GENVISOR_TEST_HELD is created, and the writer thread
then waits for good (the test ends the daemon with kill -9).

So a test can kill the daemon at the one moment that tells whether replies wait for
durability: the runtime has applied the change and queued its reply, and the journal
has not made it durable (test_journal.py).

The daemon opens its journal through `Config.open_store`, which names `SqliteStore`
from daemon.config's namespace; that name is the one swapped here (there is no
setting for a store class, and a test must not add one to the daemon).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from genvisor.daemon import config
from genvisor.daemon.sqlite_store import SqliteStore
from genvisor.daemon.store import AppendEntry, Write

HOLD = os.environ["GENVISOR_TEST_HOLD"]
HELD = Path(os.environ["GENVISOR_TEST_HELD"])


class HeldSqliteStore(SqliteStore):
    def write(self, batch: list[Write]) -> None:
        if any(isinstance(w, AppendEntry) and w.entry.content == HOLD for w in batch):
            HELD.touch()
            threading.Event().wait()  # never committed: only kill -9 ends this
        super().write(batch)

    def describe(self) -> str:
        return "held " + super().describe()  # so the test can tell it runs on this store


config.SqliteStore = HeldSqliteStore

if __name__ == "__main__":
    from genvisor.__main__ import main

    sys.exit(main())
