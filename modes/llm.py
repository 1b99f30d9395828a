"""What a mode asks of a backend and what it gets back, and the run's wire types."""

from __future__ import annotations

from typing import Any

import msgspec

from genvisor.errors import ErrorInfo
from genvisor.modes.tools import ToolSpec
from genvisor.types import ContextMessage, LLMResult, ToolCall, Usage

DEFAULT_MAX_STEPS = 8  # LLM calls per run: a tool loop's budget
DEFAULT_MAX_TOOL_CALLS = 32  # tool calls per run


class BackendConfig(msgspec.Struct, frozen=True):
    """A backend as the daemon's config names it (resolved before the run starts)."""

    name: str
    kind: str  # "scripted" | "openai"
    provider: str | None = None
    model: str | None = None
    settings: dict[str, Any] = {}


class RunDefaults(msgspec.Struct, frozen=True):
    """The daemon config's part in the precedence: call > conversation > backend > defaults."""

    backend: str
    timeout_ms: int
    stream: bool
    backends: dict[str, BackendConfig]
    coalesce_ms: int = 0


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


RunOutcome = RunSucceeded | RunFailed
