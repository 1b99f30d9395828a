"""The contract's value types (CONTRACT §6): what calls return and notifications carry.

They are frozen msgspec Structs: the wire and the code speak the same types.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from genvisor.errors import ErrorInfo

Role = Literal["user", "assistant", "system", "tool"]
ROLES: tuple[str, ...] = ("user", "assistant", "system", "tool")
Status = Literal["idle", "pending_llm", "responding", "canceled"]
RunStatus = Literal["queued", "running", "awaiting_approval", "completed", "failed", "canceled"]
TERMINAL_RUN_STATUSES: frozenset[str] = frozenset({"completed", "failed", "canceled"})
EventKind = Literal["started", "delta", "tool_call", "tool_result", "step", "approval_requested", "approval_resolved",
                    "completed", "failed", "canceled", "gap"]
# A run's last event, appended by the daemon when the run settles: exactly one per run.
TERMINAL_KINDS = frozenset({"completed", "failed", "canceled"})


class Locator(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """A conversation address: `id` alone, or `id` under `project_id` (exactly two
    parts: a third is refused, not ignored)."""

    project_id: str | None
    id: str


class TelemetryCount(msgspec.Struct, frozen=True):
    """One counter of run telemetry (see daemon.telemetry)."""

    event: str  # "run_started" | "run_finished"
    mode: str
    backend: str
    outcome: str  # "" for run_started
    category: str  # "" for run_started, "none" for a success
    count: int


class Message(msgspec.Struct, frozen=True):
    entry_id: str
    seq: int
    role: Role
    content: str
    metadata: dict[str, Any] = {}


class ContextMessage(msgspec.Struct, frozen=True):
    """One message of the context handed to a model."""

    role: Role
    content: str
    metadata: dict[str, Any] = {}


class LLMConfig(msgspec.Struct, frozen=True):
    backend: str | None = None
    provider: str | None = None
    model: str | None = None
    options: dict[str, Any] = {}


class RunInfo(msgspec.Struct, frozen=True):
    run_id: str
    mode: str
    status: RunStatus
    step: str | None = None
    started_at: float = 0.0
    finished_at: float | None = None
    reason: str | None = None


class DerivedState(msgspec.Struct, frozen=True):
    status: Status = "idle"
    turn: int = 0
    cancel_requested: bool = False
    cancel_reason: str | None = None
    last_user_message: str | None = None
    messages: list[Message] = []
    llm: LLMConfig = LLMConfig()
    skills: list[str] = []
    mode: str = "coding"
    mode_state: dict[str, Any] = {}
    active_run: RunInfo | None = None
    run_history: list[RunInfo] = []


NoteEvent = Literal[
    "llm_configured",
    "skills_configured",
    "cancel_requested",
    "mode_configured",
    "mode_switch_accepted",
    "mode_switch_rejected",
    "run_started",
    "run_finished",
    "workspace_restored",
    "turn_reverted",
    "artifact_recorded",
    "partial_output",
    "run_queued",
    "queued_run_ended",
    "approval_requested",
    "approval_resolved",
    "run_resumed",
]


class JournalEntry(msgspec.Struct, frozen=True):
    """One append-only change to a conversation: a message, or a note with an event."""

    entry_id: str
    seq: int
    kind: Literal["message", "note"]
    at: float
    role: Role | None = None
    content: str | None = None
    event: NoteEvent | None = None
    data: dict[str, Any] = {}


class TimelineEntry(msgspec.Struct, frozen=True):
    """The journal as a person reads it: messages and events, in order."""

    seq: int
    at: float
    kind: Literal["message", "event"]
    role: Role | None = None
    content: str | None = None
    event: NoteEvent | None = None
    data: dict[str, Any] = {}


class ModeInfo(msgspec.Struct, frozen=True):
    id: str
    summary: str
    capabilities: list[str]
    required_options: list[str]
    optional_options: list[str]
    defaults: dict[str, Any]
    stability: Literal["stable", "experimental"]
    version: str


class Conversation(msgspec.Struct, frozen=True):
    id: str
    project_id: str | None
    metadata: dict[str, Any]
    state: DerivedState


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ToolCall(msgspec.Struct, frozen=True):
    id: str
    name: str
    arguments: str  # JSON text, as a model sends it


class ToolResult(msgspec.Struct, frozen=True):
    call_id: str
    name: str
    content: str
    is_error: bool = False


class FileChange(msgspec.Struct, frozen=True):
    """One path a turn changed. A symlink's size and sha256 are those of its target's
    text; a nested repository (mode 160000) has neither."""

    path: str
    change: Literal["added", "modified", "deleted"]
    size_before: int | None = None
    size_after: int | None = None
    sha256_before: str | None = None
    sha256_after: str | None = None
    mode_before: str | None = None  # git's: "100644" file, "100755" executable, "120000" symlink, "160000" repository
    mode_after: str | None = None
    binary: bool = False


WorkspaceOutcome = Literal["changed", "unchanged", "restored", "restore_failed"]


class WorkspaceChanges(msgspec.Struct, frozen=True):
    """What a turn (or a revert, `ref` then its revert id) did to the workspace.

    `workspace`: "changed" or "unchanged" for a completed turn or a revert; for a run
    that did not complete, "restored", "unchanged" or "restore_failed" (its `paths`
    are then those put back, or what went wrong). `files` lists at most 2 000 paths of
    `files_total`; `diff` is git's unified diff of the text files, cut at a file's
    boundary past 256 KiB (`diff_truncated`); a binary file is named, not diffed.
    """

    ref: str = ""
    workspace: WorkspaceOutcome = "unchanged"
    files: list[FileChange] = []
    files_total: int = 0
    diff: str = ""
    diff_truncated: bool = False
    paths: list[str] = []
    reverts: str | None = None  # for a revert: the ref of the change set it undid


class LLMResult(msgspec.Struct, frozen=True):
    request_id: str
    conversation_id: str
    backend: str
    status: Literal["completed"] = "completed"
    text: str = ""
    model: str | None = None
    provider: str | None = None
    finish_reason: str | None = None
    usage: Usage = Usage()
    metadata: dict[str, Any] = {}
    changes: WorkspaceChanges = WorkspaceChanges()  # the turn's completion artifact


# ---- plans (the `planning` mode's artifact) ------------------------------------------

NonBlank = Annotated[str, msgspec.Meta(min_length=1, max_length=2_000, pattern=r"\S")]
TaskStatus = Literal["todo", "in_progress", "done", "blocked"]


class Task(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: NonBlank
    title: NonBlank
    acceptance: Annotated[list[NonBlank], msgspec.Meta(min_length=1, max_length=20)]  # how to tell it is done
    status: TaskStatus = "todo"


class Phase(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: NonBlank
    title: NonBlank
    tasks: Annotated[list[Task], msgspec.Meta(min_length=1, max_length=50)]


class Plan(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    goal: NonBlank
    phases: Annotated[list[Phase], msgspec.Meta(min_length=1, max_length=20)]

    def as_text(self) -> str:
        """The plan as a person reads it."""
        marks = {"todo": " ", "in_progress": "~", "done": "x", "blocked": "!"}
        lines = [f"Plan: {self.goal}"]
        for phase in self.phases:
            lines.append(f"\n{phase.id}. {phase.title}")
            for task in phase.tasks:
                lines.append(f"  [{marks[task.status]}] {task.id} {task.title}")
                lines.extend(f"      - {criterion}" for criterion in task.acceptance)
        return "\n".join(lines)


class PlanRecord(msgspec.Struct, frozen=True):
    """A plan as a `planning` turn committed it."""

    ref: str  # the generation that made it
    run_id: str
    at: float  # Unix time of the commit
    plan: Plan


class GenerationEvent(msgspec.Struct, frozen=True, tag=True, omit_defaults=True):
    """An event of a run. A run's events are numbered by `seq`, contiguous from 1, and
    end with exactly one terminal event (`completed`, `failed` with `error`, or
    `canceled` with `reason`). A `gap` event is no event of the run: it tells a
    reader that the events `first_seq`…`last_seq` were shed on its way (its `seq` is
    0); `stream_events` can fetch them."""

    ref: str
    kind: EventKind
    seq: int = 0
    text: str | None = None
    step: int | None = None
    tool_call: ToolCall | None = None
    tool_result: ToolResult | None = None
    error: ErrorInfo | None = None  # `failed`
    reason: str | None = None  # `canceled`; `approval_resolved`: "approved" or "denied" (`text`: the note)
    first_seq: int | None = None  # `gap`
    last_seq: int | None = None

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL_KINDS


class ApprovalRequest(msgspec.Struct, frozen=True):
    """A tool call a paused run waits for an answer to (see `resolve_approval`)."""

    ref: str
    call_id: str
    tool: str
    arguments: str  # JSON text, as the model sent it
    requested_at: float  # Unix time


class GenerationResult(msgspec.Struct, frozen=True, tag=True):
    """The terminal notification of a run that finished: exactly one of result/error."""

    ref: str
    result: LLMResult | None = None
    error: ErrorInfo | None = None

    def unwrap(self) -> LLMResult:
        if self.error is not None:
            raise self.error.to_exception()
        assert self.result is not None
        return self.result


class GenerationCanceled(msgspec.Struct, frozen=True, tag=True):
    """The terminal notification of a canceled run (the error of the same name is in
    `genvisor.errors`)."""

    ref: str
    reason: str


Notification = GenerationEvent | GenerationResult | GenerationCanceled


class DaemonInfo(msgspec.Struct, frozen=True):
    version: str
    pid: int
    uptime_s: float
    endpoint: str


class LatencySummary(msgspec.Struct, frozen=True):
    """A latency histogram at a glance (estimates from its buckets)."""

    count: int
    p50_ms: float | None
    p99_ms: float | None


class NodeStatus(msgspec.Struct, frozen=True):
    """A cluster node's share of the runs (executor "ray")."""

    node: str  # Ray's node id
    host: str
    active_runs: int
    spare_workers: int
    runs_started: int  # since the daemon connected to it


class DaemonStatus(msgspec.Struct, frozen=True):
    """`status`: how the daemon is doing — the figures its Prometheus metrics carry."""

    info: DaemonInfo
    metrics: str | None  # HOST:PORT of the Prometheus endpoint, if served
    journal: str  # "sqlite:PATH" or "memory"
    journal_unsynced: int  # writes submitted, not yet durable
    conversations: int
    active_runs: int
    max_active: int
    queued_runs: int
    max_queued: int
    spare_workers: int
    runs_started: int
    runs_finished: dict[str, int]  # outcome -> count
    admissions_rejected: int
    requests_received: int
    frames_rejected: int
    requests_refused_unread: int  # Overloaded: their connection left too much unread
    events_shed: int  # progress events not sent, for the same reason
    cleanup_failures: int
    zygote_restarts: int
    run_latency: LatencySummary
    queue_wait: LatencySummary
    worker_spawn: LatencySummary
    cancel_reaped: LatencySummary
    executor: str = "local"  # local | ray
    cluster: str | None = None  # ray: connecting | up | down
    nodes: list[NodeStatus] = []  # ray: the nodes runs go to now
    nodes_lost: int = 0  # ray: nodes lost since the daemon started (their runs ended as node_lost)
