"""Client ⇄ daemon frames: a versioned envelope around tagged unions.

A client sends one `ClientFrame` per ZeroMQ message; the daemon answers each with
exactly one `Reply` or `Failure` carrying the same `id`, and pushes `Notify` frames to
the client that owns a generation. A `Reply` body is encoded from the call's result
type and decoded by the client as that type (`msgspec.Raw`): the reply union stays
closed without tagging every result type.
"""

from __future__ import annotations

from typing import Any

import msgspec

from genvisor.errors import ErrorInfo
from genvisor.limits import AWAIT_CANCEL_REASON, AWAIT_TIMEOUT_MS, CONTEXT_MESSAGES
from genvisor.types import Conversation, GenerationEvent, LLMResult, Locator, Notification, TelemetryCount  # noqa: F401 — part of the wire

PROTOCOL_VERSION = 1

# Frame size limit. A million-token context is ~4 MB of text; 16 MiB leaves headroom
# for metadata while keeping one frame's decode bounded (h11 caps an incomplete event
# at 16 KiB for headers; our unit is a whole request, hence larger). Frames above it
# are answered BadRequest; above HARD_MAX_FRAME_BYTES ZeroMQ drops the peer unread.
MAX_FRAME_BYTES = 16 * 1024 * 1024
HARD_MAX_FRAME_BYTES = 4 * MAX_FRAME_BYTES


# ---- requests -------------------------------------------------------------------------


class Request(msgspec.Struct, frozen=True, tag_field="op", forbid_unknown_fields=True):
    pass


class Ping(Request, frozen=True, tag="ping"):
    pass


class StartConversation(Request, frozen=True, tag="start_conversation"):
    id: str
    project_id: str | None = None
    metadata: Any = None  # must be a mapping: checked by the daemon (InvalidOptions)


class EnsureConversation(Request, frozen=True, tag="ensure_conversation"):
    id: str
    project_id: str | None = None
    metadata: Any = None


class SendUserMessage(Request, frozen=True, tag="send_user_message"):
    loc: Locator
    content: str
    metadata: Any = None


class RecordAssistantMessage(Request, frozen=True, tag="record_assistant_message"):
    loc: Locator
    content: str
    metadata: Any = None


class ConfigureLLM(Request, frozen=True, tag="configure_llm"):
    loc: Locator
    backend: str | None = None
    provider: str | None = None
    model: str | None = None
    options: Any = None


class ConfigureSkills(Request, frozen=True, tag="configure_skills"):
    loc: Locator
    enabled: list[Any]


class ConfigureMode(Request, frozen=True, tag="configure_mode"):
    loc: Locator
    mode: str
    mode_state: Any = None
    reason: str | None = None
    force: bool = False
    cancel_reason: str | None = None
    cause_id: str | None = None


class GetConversation(Request, frozen=True, tag="conversation"):
    loc: Locator


class GetDerivedState(Request, frozen=True, tag="derived_state"):
    loc: Locator


class GetMessages(Request, frozen=True, tag="conversation_messages"):
    loc: Locator
    max_messages: int | None = None
    roles: list[Any] | None = None


class GetLLMContext(Request, frozen=True, tag="conversation_llm_context"):
    loc: Locator
    max_messages: int = CONTEXT_MESSAGES
    include_system: bool = False
    include_tool: bool = False


class GetTimeline(Request, frozen=True, tag="conversation_timeline"):
    loc: Locator


class GetThreadEntries(Request, frozen=True, tag="conversation_thread_entries"):
    loc: Locator


class GetMode(Request, frozen=True, tag="mode"):
    loc: Locator


class SupportedModes(Request, frozen=True, tag="supported_modes"):
    pass


class StopConversation(Request, frozen=True, tag="stop_conversation"):
    loc: Locator


class GetTelemetry(Request, frozen=True, tag="telemetry"):
    pass


class GetStatus(Request, frozen=True, tag="status"):
    pass


# Generation options travel untyped on purpose: the contract (baseline parity) says an
# invalid option still returns a ref and the *run* ends with LLMError("config").
GenerationOptions = dict[str, Any]


class GenerateAssistantReply(Request, frozen=True, tag="generate_assistant_reply"):
    loc: Locator
    options: GenerationOptions = {}


# An await's `timeout_ms`: None waits for the outcome however long the run takes (its
# own deadline, `timeout_ms` + the deadline grace, bounds it).


class AwaitGeneration(Request, frozen=True, tag="await_generation"):
    loc: Locator
    ref: str
    timeout_ms: int | None = AWAIT_TIMEOUT_MS
    cancel_on_timeout: bool = True
    cancel_reason: str = AWAIT_CANCEL_REASON


class CancelGeneration(Request, frozen=True, tag="cancel_generation"):
    loc: Locator
    reason: str = "cancel_requested"


class SendAndGenerate(Request, frozen=True, tag="send_and_generate"):
    """Send → generate → await → read in one round trip, stopping at the first error."""

    loc: Locator
    content: str
    message_metadata: Any = None
    options: GenerationOptions = {}
    timeout_ms: int | None = AWAIT_TIMEOUT_MS
    cancel_on_timeout: bool = True
    cancel_reason: str = AWAIT_CANCEL_REASON


class StreamEvents(Request, frozen=True, tag="stream_events"):
    """A run's events after `after_seq`; none yet: wait up to `wait_ms` for some."""

    loc: Locator
    ref: str
    after_seq: int = 0
    wait_ms: int = 0


class PendingApprovals(Request, frozen=True, tag="pending_approvals"):
    loc: Locator


class ResolveApproval(Request, frozen=True, tag="resolve_approval"):
    loc: Locator
    ref: str
    call_id: str
    approve: bool
    note: str | None = None


class GetPlans(Request, frozen=True, tag="plans"):
    loc: Locator


class TurnChanges(Request, frozen=True, tag="turn_changes"):
    loc: Locator
    ref: str


class RevertTurn(Request, frozen=True, tag="revert_turn"):
    loc: Locator
    ref: str
    reason: str | None = None


AnyRequest = (
    Ping | StartConversation | EnsureConversation | SendUserMessage | RecordAssistantMessage | ConfigureLLM
    | ConfigureSkills | ConfigureMode | GetConversation | GetDerivedState | GetMessages | GetLLMContext | GetTimeline
    | GetThreadEntries | GetMode | SupportedModes | StopConversation | GetTelemetry | GetStatus | GenerateAssistantReply
    | AwaitGeneration | CancelGeneration | SendAndGenerate | TurnChanges | RevertTurn | GetPlans | StreamEvents
    | PendingApprovals | ResolveApproval
)


class ClientFrame(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    v: int
    id: int
    req: AnyRequest


# ---- replies and notifications --------------------------------------------------------


class GenerationRef(msgspec.Struct, frozen=True):
    ref: str


class Empty(msgspec.Struct, frozen=True):
    pass


class Reply(msgspec.Struct, frozen=True, tag="reply"):
    v: int
    id: int
    body: msgspec.Raw


class Failure(msgspec.Struct, frozen=True, tag="failure"):
    v: int
    id: int
    error: ErrorInfo


class Notify(msgspec.Struct, frozen=True, tag="notify"):
    v: int
    note: Notification


class RawNotify(msgspec.Struct, frozen=True, tag="notify"):
    """A `Notify` whose note is already encoded: a run's event is relayed as its worker
    encoded it, not decoded and encoded again."""

    v: int
    note: msgspec.Raw


ServerFrame = Reply | Failure | Notify


class Ensured(msgspec.Struct, frozen=True):
    conversation: Conversation
    status: str  # "started" | "existing"


class ModeId(msgspec.Struct, frozen=True):
    mode: str


class ConversationAndResult(msgspec.Struct, frozen=True):
    """The body of a `SendAndGenerate` reply."""

    conversation: Conversation
    result: LLMResult


class EventBatch(msgspec.Struct, frozen=True):
    """The body of a `StreamEvents` reply: events in seq order; `ended` once the last
    of them is the run's terminal event."""

    events: list[GenerationEvent]
    ended: bool


class RawEventBatch(msgspec.Struct, frozen=True):
    """An `EventBatch` as the daemon sends it: its events as they were encoded."""

    events: list[msgspec.Raw]
    ended: bool
