"""`python tests/unruly_events_daemon.py serve …`: the real daemon, but its workers run
a turn that breaks the event protocol once, as the run's last user message says —
`wrong_ref`, `repeated_seq`, `skipped_seq`, `terminal_kind` or `gap_kind` — and then
goes on as a turn does (any other message: a well-behaved turn). A worker is untrusted: the daemon must end that run alone.

The daemon names its workers' target in daemon.server's namespace (`WORKER_TARGET`);
that name is the one swapped here (there is no setting for it, and a test must not
add one to the daemon). The zygote imports this module by its name: its folder is on
PYTHONPATH.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from genvisor.modes.llm import RunSpec
from genvisor.modes.loop import TurnTarget
from genvisor.types import GenerationEvent

_spec = msgspec.msgpack.Decoder(RunSpec)


def _broken(how: str, event: GenerationEvent) -> GenerationEvent:
    replace = msgspec.structs.replace
    breaks = {
        "wrong_ref": lambda: replace(event, ref="gen_someone_else"),
        "repeated_seq": lambda: replace(event, seq=event.seq - 1),
        "skipped_seq": lambda: replace(event, seq=event.seq + 1),
        "terminal_kind": lambda: replace(event, kind="completed"),
        "gap_kind": lambda: replace(event, kind="gap", first_seq=1, last_seq=9),
    }
    return breaks[how]() if how in breaks else event


class UnrulyTurn(TurnTarget):
    async def run(self, spec: msgspec.Raw, emit: Callable[[Any], Awaitable[None]], host: Any) -> Any:
        decoded = _spec.decode(spec)
        how = decoded.request.messages[-1].content if decoded.request else ""

        async def unruly(event: GenerationEvent) -> None:
            await emit(_broken(how, event) if event.seq == 2 else event)

        return await super().run(spec, unruly, host)


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    os.environ["PYTHONPATH"] = here + os.pathsep + os.environ.get("PYTHONPATH", "")
    sys.path.insert(0, here)
    import unruly_events_daemon  # by its module's name, not __main__'s: the zygote imports it so
    from genvisor.daemon import server

    server.WORKER_TARGET = unruly_events_daemon.UnrulyTurn
    from genvisor.__main__ import main

    sys.exit(main())
