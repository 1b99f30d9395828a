"""The closed error taxonomy of CONTRACT §7.

Every error that crosses the wire is one of the classes below, identified by its
`code`. `ErrorInfo` is the one wire form of all of them: a flat, typed record whose
optional fields are filled by the classes that have them. A client never sees a
traceback from the daemon: anything unexpected becomes `InternalError` with an
incident id that the daemon also logs.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import msgspec

LLMErrorCategory = Literal["config", "auth", "timeout", "provider", "transport", "canceled", "unknown"]
RETRYABLE_BY_DEFAULT: frozenset[str] = frozenset({"timeout", "provider", "transport"})


class Diagnostic(msgspec.Struct, frozen=True):
    """One problem in a mode configuration (`InvalidModeConfig.diagnostics`)."""

    code: str
    path: str
    message: str


class ErrorInfo(msgspec.Struct, frozen=True, omit_defaults=True):
    """The wire form of every `GenvisorError`."""

    code: str
    message: str
    reason: str | None = None
    ref: str | None = None
    field: str | None = None
    problem: str | None = None
    category: LLMErrorCategory | None = None
    retryable: bool | None = None
    details: dict[str, Any] | None = None
    mode: str | None = None
    supported: list[str] | None = None
    diagnostics: list[Diagnostic] | None = None
    paths: list[str] | None = None

    def to_exception(self) -> GenvisorError:
        cls = _BY_CODE.get(self.code)
        if cls is None:
            # A newer daemon may know codes this client does not: keep the message.
            return GenvisorError(f"[{self.code}] {self.message}")
        return cls._from_info(self)


class GenvisorError(Exception):
    """Base of every genvisor error."""

    code: ClassVar[str] = "error"
    _info_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def info(self) -> ErrorInfo:
        fields = {name: getattr(self, name) for name in self._info_fields}
        return ErrorInfo(code=self.code, message=self.message, **fields)

    @classmethod
    def _from_info(cls, info: ErrorInfo) -> GenvisorError:
        return cls(info.message)

    def __reduce__(self):  # keep subclasses with keyword-only fields picklable
        return (_rebuild, (self.info(),))


def _rebuild(info: ErrorInfo) -> GenvisorError:
    return info.to_exception()


class InvalidLocator(GenvisorError):
    """A locator must be a non-blank str or a (project_id, conversation_id) tuple of them."""

    code = "invalid_locator"


class NotFound(GenvisorError):
    """No such conversation, generation reference or mode."""

    code = "not_found"


class AlreadyStarted(GenvisorError):
    """The conversation already exists."""

    code = "already_started"


class InvalidOptions(GenvisorError):
    """An option has the wrong type or value."""

    code = "invalid_options"
    _info_fields = ("field", "problem")

    def __init__(self, field: str, problem: str, message: str = "") -> None:
        self.field = field
        self.problem = problem
        super().__init__(message or f"invalid option {field!r}: {problem}")

    @classmethod
    def _from_info(cls, info: ErrorInfo) -> GenvisorError:
        return cls(info.field or "", info.problem or "", info.message)


class EmptyMessage(GenvisorError):
    """Message content is blank."""

    code = "empty_message"


class GenerationInProgress(GenvisorError):
    """The conversation already has an active generation."""

    code = "generation_in_progress"


class NoGenerationInProgress(GenvisorError):
    """The conversation has no active generation to cancel."""

    code = "no_generation_in_progress"


class AwaitTimeout(GenvisorError, TimeoutError):
    """The generation did not finish within the await timeout."""

    code = "await_timeout"


class GenerationCanceled(GenvisorError):
    """The generation was canceled; `reason` says why."""

    code = "generation_canceled"
    _info_fields = ("reason", "ref")

    def __init__(self, reason: str, ref: str | None = None, message: str = "") -> None:
        self.reason = reason
        self.ref = ref
        super().__init__(message or f"generation canceled: {reason}")

    @classmethod
    def _from_info(cls, info: ErrorInfo) -> GenvisorError:
        return cls(info.reason or "", info.ref, info.message)


class LLMError(GenvisorError):
    """The run failed. `category` is one of config auth timeout provider transport
    canceled unknown; `retryable` defaults to true for timeout, provider, transport."""

    code = "llm_error"
    _info_fields = ("category", "retryable", "details")

    def __init__(
        self,
        category: LLMErrorCategory,
        message: str,
        retryable: bool | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.category = category
        self.retryable = category in RETRYABLE_BY_DEFAULT if retryable is None else retryable
        self.details = dict(details or {})
        super().__init__(message)

    @classmethod
    def _from_info(cls, info: ErrorInfo) -> GenvisorError:
        return cls(info.category or "unknown", info.message, info.retryable, info.details)


class UnsupportedMode(GenvisorError):
    """The mode is not registered."""

    code = "unsupported_mode"
    _info_fields = ("mode", "supported")

    def __init__(self, mode: str, supported: list[str], message: str = "") -> None:
        self.mode = mode
        self.supported = list(supported)
        super().__init__(message or f"unsupported mode {mode!r} (supported: {', '.join(supported)})")

    @classmethod
    def _from_info(cls, info: ErrorInfo) -> GenvisorError:
        return cls(info.mode or "", info.supported or [], info.message)


class InvalidModeConfig(GenvisorError):
    """The mode rejected its configuration; see `diagnostics`."""

    code = "invalid_mode_config"
    _info_fields = ("mode", "diagnostics")

    def __init__(self, mode: str, diagnostics: list[Diagnostic], message: str = "") -> None:
        self.mode = mode
        self.diagnostics = list(diagnostics)
        text = "; ".join(f"{d.path}: {d.message}" for d in diagnostics)
        super().__init__(message or f"invalid config for mode {mode!r}: {text}")

    @classmethod
    def _from_info(cls, info: ErrorInfo) -> GenvisorError:
        return cls(info.mode or "", info.diagnostics or [], info.message)


class RunInProgress(GenvisorError):
    """A run is active; a mode switch needs force=True."""

    code = "run_in_progress"


class ForceCancelReasonRequired(GenvisorError):
    """A forced mode switch needs a non-blank cancel_reason."""

    code = "force_cancel_reason_required"


class Overloaded(GenvisorError):
    """The admission queue is full; retry later. Nothing was recorded."""

    code = "overloaded"


class BadRequest(GenvisorError):
    """A malformed or oversized frame, or a value of the wrong type."""

    code = "bad_request"

    @property
    def detail(self) -> str:
        return self.message


class RevertConflict(GenvisorError):
    """A path the turn changed has changed since; nothing was reverted. `paths` names them."""

    code = "revert_conflict"
    _info_fields = ("ref", "paths")

    def __init__(self, ref: str, paths: list[str], message: str = "") -> None:
        self.ref = ref
        self.paths = list(paths)
        shown = ", ".join(paths[:10]) + (f" and {len(paths) - 10} more" if len(paths) > 10 else "")
        super().__init__(message or f"cannot revert {ref}: changed since: {shown}")

    @classmethod
    def _from_info(cls, info: ErrorInfo) -> GenvisorError:
        return cls(info.ref or "", info.paths or [], info.message)


class WorkspaceUnavailable(GenvisorError):
    """On a cluster: the node that holds the conversation's workspace cannot be reached
    now (lost, or the cluster is down); nothing changed. Retry once it is back."""

    code = "workspace_unavailable"


class DaemonUnavailable(GenvisorError):
    """No daemon answered within the client timeout."""

    code = "daemon_unavailable"


class InternalError(GenvisorError):
    """The daemon hit a bug; the message carries an incident id found in its log."""

    code = "internal"


_BY_CODE: dict[str, type[GenvisorError]] = {
    cls.code: cls
    for cls in (
        InvalidLocator,
        NotFound,
        AlreadyStarted,
        InvalidOptions,
        EmptyMessage,
        GenerationInProgress,
        NoGenerationInProgress,
        AwaitTimeout,
        GenerationCanceled,
        LLMError,
        UnsupportedMode,
        InvalidModeConfig,
        RunInProgress,
        ForceCancelReasonRequired,
        Overloaded,
        BadRequest,
        RevertConflict,
        WorkspaceUnavailable,
        DaemonUnavailable,
        InternalError,
    )
}
ERROR_CODES: frozenset[str] = frozenset(_BY_CODE)
