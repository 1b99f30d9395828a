"""The run protocol: what every mode implements, and all the executor loop speaks.

A mode is three things around one state machine (the seed's three steps):

1. `assemble(request)` builds a run's `RunSpec` from the conversation's state and the
   call's options — the context, the backend, the tools, the budgets;
2. `new_run(spec)` gives the run: a sans-I/O machine in the style of h11. It is fed
   events (`Start`, `LLMReplied`, `LLMFailed`, `ToolsFinished`) and answers each with
   the next directive (`CallLLM`, `RunTools`, `Commit`, `Fail`); it performs no I/O,
   knows no process, and cannot tell which executor runs it;
3. its `Commit` carries what the daemon commits: the turn's messages, its result and
   its artifacts (a plan, say), in one transaction.

The executor loop (`modes.loop`) interprets directives with the capabilities it is
handed; nothing in it knows a mode.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from genvisor.errors import Diagnostic, ErrorInfo
from genvisor.modes.llm import (
    LLMReplied as LLMReplied,
    LLMRequest,
    RunDefaults,
    RunOutcome,
    RunSpec,
    RunSucceeded,
    ToolsFinished as ToolsFinished,  # events, with Start and LLMFailed below
)
from genvisor.types import DerivedState, ModeInfo, ToolCall

# ---- directives: what a run asks for next ------------------------------------------------


class CallLLM(msgspec.Struct, frozen=True):
    request: LLMRequest
    call_index: int


class RunTools(msgspec.Struct, frozen=True):
    calls: list[ToolCall]


class Commit(msgspec.Struct, frozen=True):
    outcome: RunSucceeded


class Fail(msgspec.Struct, frozen=True):
    error: ErrorInfo


Directive = CallLLM | RunTools | Commit | Fail

# ---- events: what happened ---------------------------------------------------------------


class Start(msgspec.Struct, frozen=True):
    pass


class LLMFailed(msgspec.Struct, frozen=True):
    error: ErrorInfo


Event = Start | LLMReplied | LLMFailed | ToolsFinished


class ProtocolViolation(Exception):
    """An executor fed a run an event its current step does not accept."""


class Transitions:
    """A run's steps as data: which events each step accepts. `enter` checks one."""

    def __init__(self, accepts: dict[str, tuple[type, ...]], first: str) -> None:
        self.accepts = accepts
        self.step = first

    def enter(self, event: Event) -> None:
        if not isinstance(event, self.accepts[self.step]):
            raise ProtocolViolation(f"{type(event).__name__} is not accepted in step {self.step!r}")


# ---- a mode and its runs -------------------------------------------------------------------

# A mode's options: name → a str, an int within (low, high), or a mapping (the mode checks its contents).
OptionSchema = dict[str, type[str] | type[dict[str, Any]] | tuple[int, int]]


def check_options(mode: str, mode_state: dict[str, Any], schema: OptionSchema) -> list[Diagnostic]:
    """What is wrong with `mode_state` for a mode whose options `schema` gives (empty
    when it is valid): an unknown option, a value of the wrong type (a bool is no int),
    an int out of its range."""
    problems = []
    for key, value in mode_state.items():
        expected = schema.get(key)
        path = f"/{key}"
        if expected is None:
            problems.append(Diagnostic("unknown_option", path, f"{mode} has no option {key!r} (options: {', '.join(schema)})"))
        elif expected is str or expected is dict:
            if not isinstance(value, expected):
                problems.append(Diagnostic("invalid_type", path, f"{key} must be {expected.__name__}"))
        elif not isinstance(value, int) or isinstance(value, bool):
            problems.append(Diagnostic("invalid_type", path, f"{key} must be int"))
        elif isinstance(expected, tuple) and not expected[0] <= value <= expected[1]:
            problems.append(Diagnostic("out_of_range", path, f"{key} must be within {expected[0]}..{expected[1]}"))
    return problems


class AssemblyRequest(msgspec.Struct, frozen=True):
    """What a mode assembles a run's spec from (the daemon fills it in)."""

    ref: str
    run_id: str
    conversation_id: str
    state: DerivedState
    options: dict[str, Any]  # the call's generation options, as sent: the mode checks them
    defaults: RunDefaults
    workspace: str | None = None


class Run(Protocol):
    spec: RunSpec

    def feed(self, event: Event) -> Directive: ...


class Mode(Protocol):
    info: ModeInfo

    def validate(self, mode_state: dict[str, Any]) -> list[Diagnostic]: ...

    def assemble(self, request: AssemblyRequest) -> RunSpec: ...

    def new_run(self, spec: RunSpec) -> Run: ...


_outcome_decoder = msgspec.msgpack.Decoder(RunOutcome)


class MalformedOutcome(Exception):
    """A run's outcome, as it came back from its executor, does not decode."""


def decode_outcome(raw: bytes) -> RunOutcome:
    """A run's outcome as its executor sent it (a worker's frame is hostile too): what
    the daemon commits, or the run's failure."""
    try:
        return _outcome_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise MalformedOutcome(str(exc)) from None
