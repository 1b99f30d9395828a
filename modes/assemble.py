"""Step 1 of the coding mode: generation options + history → the run's `RunSpec`.

Pure: the conversation's owner calls it with what it holds. Invalid options, an
unknown backend or an empty context do not raise: they give a spec whose run fails
with `LLMError("config")`, because the baseline returned a ref in those cases too.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

from genvisor.errors import LLMError
from genvisor.limits import CONTEXT_MESSAGES
from genvisor.modes.llm import DEFAULT_MAX_STEPS, DEFAULT_MAX_TOOL_CALLS, LLMRequest, RunSpec
from genvisor.modes.protocol import AssemblyRequest
from genvisor.modes.tools import manifest
from genvisor.types import ContextMessage, Message


class GenerationOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    backend: str | None = None
    provider: str | None = None
    model: str | None = None
    stream: bool | None = None
    timeout_ms: int | None = None
    system_prompt: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    max_messages: int = CONTEXT_MESSAGES
    include_system: bool = False
    include_tool: bool = False
    request_id: str | None = None
    metadata: dict[str, Any] = {}
    request_options: dict[str, Any] = {}
    backend_opts: dict[str, Any] = {}
    record_metadata: dict[str, Any] = {}
    events: bool = False
    multitask: str = "reject"  # the daemon's (what to do when a run is active); checked there
    approval_timeout_ms: int | None = None


# Where a model request goes and how it travels is the operator's: the backend's table
# in the daemon config. These keys would hand that to a client: the address and the
# key, and the SDK's per-request transport arguments — a `Host` in extra_headers sends
# the request, with the operator's key, to another virtual host behind the configured
# address (a gateway, a reverse proxy).
TRANSPORT_KEYS = frozenset({"base_url", "api_key", "api_key_env", "extra_headers", "extra_query", "timeout"})


def transport_keys(options: dict[str, Any]) -> list[str]:
    """The keys of a client's `options` that would say where or how a request travels."""
    return sorted(TRANSPORT_KEYS.intersection(options))


def parse_options(raw: dict[str, Any]) -> GenerationOptions:
    """Raises LLMError("config") with what is wrong."""
    try:
        options = msgspec.convert(raw, GenerationOptions)
    except msgspec.ValidationError as exc:
        raise LLMError("config", f"invalid generation options: {exc}") from None
    if named := transport_keys(options.request_options):
        raise LLMError("config", f"invalid generation options: request_options may not set {', '.join(named)} "
                                 "(where and how a request travels is the daemon config's)")
    if options.max_messages < 0:
        raise LLMError("config", "invalid generation options: max_messages must be >= 0")
    if options.timeout_ms is not None:
        _check_timeout(options.timeout_ms, "timeout_ms")
    if options.temperature is not None and not math.isfinite(options.temperature):
        raise LLMError("config", "invalid generation options: temperature must be a finite number")
    if options.max_tokens is not None and options.max_tokens <= 0:
        raise LLMError("config", "invalid generation options: max_tokens must be > 0")
    if options.approval_timeout_ms is not None:
        _check_timeout(options.approval_timeout_ms, "approval_timeout_ms")
    return options


# A generation's timeout: up to a day. Beyond that it is a mistake (or an attempt to
# hold a worker and an admission slot forever), not a plan.
MAX_TIMEOUT_MS = 86_400_000


def _check_timeout(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= MAX_TIMEOUT_MS:
        raise LLMError("config", f"invalid {where}: {value!r} is not a whole number of milliseconds in 1..{MAX_TIMEOUT_MS}")
    return value


def _check_stream(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise LLMError("config", f"invalid {where}: {value!r} is not true or false")
    return value


def context_window(messages: list[Message], max_messages: int, include_system: bool, include_tool: bool) -> list[ContextMessage]:
    kept = [
        ContextMessage(m.role, m.content)
        for m in messages
        if m.content.strip() and (m.role in ("user", "assistant") or (m.role == "system" and include_system) or (m.role == "tool" and include_tool))
    ]
    return kept[-max_messages:] if max_messages else []


def build_run_spec(assembly: AssemblyRequest, *, tools: frozenset[str] | None = None, system_prompt: str | None = None) -> RunSpec:
    """The spec of a run of `assembly`: its context, backend, tools (the enabled skills,
    only those in `tools` if given) and budgets. `system_prompt` is the mode's, used
    when neither the call nor the mode state gives one."""
    ref, run_id, conversation_id, state = assembly.ref, assembly.run_id, assembly.conversation_id, assembly.state
    raw_options, defaults, workspace = assembly.options, assembly.defaults, assembly.workspace
    base: dict[str, Any] = dict(ref=ref, run_id=run_id, conversation_id=conversation_id, mode=state.mode, workspace=workspace,
                                coalesce_ms=defaults.coalesce_ms)
    try:
        options = parse_options(raw_options)
    except LLMError as error:
        return RunSpec(**base, request_id=run_id, request=None, error=error.info())
    request_id = options.request_id or run_id
    base.update(request_id=request_id, record_metadata=options.record_metadata, events=options.events)
    llm = state.llm
    backend_name = options.backend or llm.backend or defaults.backend
    backend = defaults.backends.get(backend_name)
    if backend is None:
        known = ", ".join(sorted(defaults.backends)) or "none"
        unknown = LLMError("config", f"unknown backend {backend_name!r} (configured: {known})")
        return RunSpec(**base, request=None, error=unknown.info())
    messages = context_window(state.messages, options.max_messages, options.include_system, options.include_tool)
    if not messages:
        return RunSpec(**base, request=None, error=LLMError("config", "the context is empty: nothing to answer").info())
    system_prompt = options.system_prompt or state.mode_state.get("system_prompt") or system_prompt
    if system_prompt:
        messages = [ContextMessage("system", system_prompt), *messages]
    base["max_steps"] = state.mode_state.get("max_steps", DEFAULT_MAX_STEPS)
    base["max_tool_calls"] = state.mode_state.get("max_tool_calls", DEFAULT_MAX_TOOL_CALLS)
    # The conversation's options were journaled as a client sent them (configure_llm
    # merges any mapping): they are checked here, where they take effect, so a bad one
    # fails this run with a config error, and keeps failing runs until it is replaced.
    try:
        stream = _check_stream(_first(options.stream, llm.options.get("stream"), backend.settings.get("stream"), defaults.stream),
                               "stream (from the call, the conversation's llm options or the backend)")
        timeout_ms = _check_timeout(
            _first(options.timeout_ms, llm.options.get("timeout_ms"), backend.settings.get("timeout_ms"), defaults.timeout_ms),
            "timeout_ms (from the call, the conversation's llm options or the backend)",
        )
    except LLMError as bad:
        return RunSpec(**base, request=None, error=bad.info())
    request = LLMRequest(
        messages=messages,
        backend=backend,
        model=options.model or llm.model or backend.model,
        provider=options.provider or llm.provider or backend.provider,
        stream=stream,
        timeout_ms=timeout_ms,
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        request_options=options.request_options,
        backend_opts=options.backend_opts,
        tools=manifest([skill for skill in state.skills if tools is None or skill in tools]),
    )
    enabled = {tool.name for tool in request.tools}
    approvals = {**defaults.approvals, **state.mode_state.get("approvals", {})}  # checked by the mode's validate
    base["approvals"] = {tool: policy for tool, policy in approvals.items() if policy != "allow" and tool in enabled}
    return RunSpec(**base, request=request, approval_timeout_ms=options.approval_timeout_ms)


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)
