"""What a mode asks of a backend and what it gets back, and the run's wire types."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from genvisor.errors import ErrorInfo
from genvisor.modes.tools import ToolSpec
from genvisor.types import ContextMessage, LLMResult, ToolCall, ToolResult, Usage

DEFAULT_MAX_STEPS = 8  # LLM calls per run: a tool loop's budget
DEFAULT_MAX_TOOL_CALLS = 32  # tool calls per run


class BackendConfig(msgspec.Struct, frozen=True):
    """A backend as the daemon's config names it (resolved before the run starts)."""

    name: str
    kind: str  # "scripted" | "openai"
    provider: str | None = None
    model: str | None = None
    settings: dict[str, Any] = {}


Approval = Literal["allow", "ask", "deny"]
# A tool's approval policy unless the daemon config or the conversation says otherwise:
# a command reaches beyond the workspace's files, so it is asked for.
DEFAULT_APPROVALS: dict[str, Approval] = {"run_command": "ask"}


class RunDefaults(msgspec.Struct, frozen=True):
    """The daemon config's part in the precedence: call > conversation > backend > defaults."""

    backend: str
    timeout_ms: int
    stream: bool
    backends: dict[str, BackendConfig]
    coalesce_ms: int = 0
    approvals: dict[str, Approval] = msgspec.field(default_factory=lambda: dict(DEFAULT_APPROVALS))


class LLMRequest(msgspec.Struct, frozen=True):
    messages: list[ContextMessage]
    backend: BackendConfig
    model: str | None = None
    provider: str | None = None
    stream: bool = False
    timeout_ms: int = 60_000
    max_tokens: int | None = None
    temperature: float | None = None
    request_options: dict[str, Any] = {}
    backend_opts: dict[str, Any] = {}
    tools: list[ToolSpec] = []  # the tools the model may call (from the conversation's skills)


class LLMReply(msgspec.Struct, frozen=True):
    text: str = ""
    tool_calls: list[ToolCall] = []
    finish_reason: str | None = "stop"
    usage: Usage = Usage()
    model: str | None = None
    metadata: dict[str, Any] = {}


class RunSpec(msgspec.Struct, frozen=True):
    """Everything a worker needs for one run; assembled by the conversation's owner."""

    ref: str
    run_id: str
    conversation_id: str
    mode: str
    request_id: str
    request: LLMRequest | None  # None when assembly failed: the run fails with `error`
    error: ErrorInfo | None = None
    record_metadata: dict[str, Any] = {}
    max_steps: int = DEFAULT_MAX_STEPS
    max_tool_calls: int = DEFAULT_MAX_TOOL_CALLS
    events: bool = False  # emit progress events (the owner asked for them)
    workspace: str | None = None  # the directory the tools work in
    # Where the workspace's snapshots live (see modes.workspace_snapshot): the worker
    # takes one before the run's first effect, so that the run can be undone.
    snapshot_store: str | None = None
    snapshot_excludes: list[str] = []  # gitignore-style paths neither captured nor restored
    mode_options: dict[str, Any] = {}  # what the run's mode set aside for its run (its own keys)
    coalesce_ms: int = 0  # consecutive text deltas within this window are sent as one event (0: each alone)
    approvals: dict[str, Approval] = {}  # tool → "ask" or "deny"; a tool not named is allowed
    approval_timeout_ms: int | None = None  # how long a paused run waits for its answers (None: as long as it takes)
    resume: Resume | None = None  # a run that paused for approvals, going on in a fresh worker


class LLMReplied(msgspec.Struct, frozen=True, tag=True):
    reply: LLMReply


class ToolsFinished(msgspec.Struct, frozen=True, tag=True):
    results: list[ToolResult]


# What a run was fed after its Start, in order: replayed into a fresh run, it reaches
# the step the run paused at, without a call to the model or a tool.
Fed = LLMReplied | ToolsFinished


class Decision(msgspec.Struct, frozen=True):
    """The answer to one approval request."""

    approve: bool
    note: str | None = None


class Resume(msgspec.Struct, frozen=True):
    """How a paused run goes on: what it was fed, the answers to its approvals, the seq of
    its next event, and whether its workspace snapshot is taken already."""

    fed: list[Fed]
    decisions: dict[str, Decision]
    first_seq: int
    snapshotted: bool = False


class Artifact(msgspec.Struct, frozen=True):
    """Something a turn made besides its messages (a plan), committed with them."""

    kind: str
    data: dict[str, Any]


class RunSucceeded(msgspec.Struct, frozen=True, tag=True):
    result: LLMResult
    messages: list[ContextMessage]  # what to commit: the turn's tool messages, then the reply
    artifacts: list[Artifact] = []


class RunFailed(msgspec.Struct, frozen=True, tag=True):
    error: ErrorInfo


class RunPaused(msgspec.Struct, frozen=True, tag=True):
    """The run needs approvals before it can run the tool calls of `calls` whose ids are
    in `asks`: it stops here, and a fresh worker goes on once they are answered."""

    fed: list[Fed]
    calls: list[ToolCall]
    asks: list[str]
    snapshotted: bool = False


RunOutcome = RunSucceeded | RunFailed | RunPaused
