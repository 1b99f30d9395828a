"""genvisor: a daemon that runs LLM coding-assistant turns, one isolated worker
process per generation, driven by thin clients over ZeroMQ."""

from genvisor._version import __version__
from genvisor.types import (
    ApprovalRequest,
    ContextMessage,
    Conversation,
    DaemonInfo,
    DaemonStatus,
    DerivedState,
    FileChange,
    GenerationEvent,
    GenerationResult,
    LatencySummary,
    LLMConfig,
    LLMResult,
    Message,
    RunInfo,
    ToolCall,
    ToolResult,
    Usage,
    WorkspaceChanges,
)

__all__ = [
    "__version__",
    "ApprovalRequest",
    "ContextMessage",
    "Conversation",
    "DaemonInfo",
    "DaemonStatus",
    "DerivedState",
    "FileChange",
    "GenerationEvent",
    "GenerationResult",
    "LatencySummary",
    "LLMConfig",
    "LLMResult",
    "Message",
    "RunInfo",
    "ToolCall",
    "ToolResult",
    "Usage",
    "WorkspaceChanges",
]
