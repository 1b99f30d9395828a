"""The offline `scripted` backend (CONTRACT §8): deterministic, for tests, demo, bench.

`backend_opts`: `reply` (default: echo of the last user message), `delay_ms`,
`chunks` + `chunk_delay_ms` (streamed deltas), `error` ({category, message,
retryable?, details?}), `crash` ("exit" | "signal" | "hang"), `script` (one turn per
LLM call: {"text": …} or {"tool_calls": [{"name", "arguments"}]}, each may have its
own `delay_ms`, `error`, `crash`), and `spawn`
(an argv started in the run's process group before answering, left running: it
exercises the cleanup of a run's effects).

`crash` and `spawn` are the run's host's (`genvisor.host`): in a worker, a crash is
the worker's; in-process, the exception that executor reports as a worker's exit
would be (`hang` then simply never answers), and `spawn` is refused (nothing would
reap what it starts).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import trio

from genvisor.errors import LLMError, LLMErrorCategory
from genvisor.host import Host, HostRefused
from genvisor.modes.llm import LLMReply, LLMRequest
from genvisor.types import ToolCall, Usage

OnDelta = Callable[[str], Awaitable[None]]


class ScriptedError(msgspec.Struct, frozen=True):
    category: LLMErrorCategory
    message: str
    retryable: bool | None = None
    details: dict[str, Any] | None = None


class ScriptedCall(msgspec.Struct, frozen=True):
    name: str = ""
    arguments: Any = {}  # JSON text as a model sends it, or a value to send as JSON


class ScriptedTurn(msgspec.Struct, frozen=True):
    """One LLM call's answer: text, or tool calls (with optional text). `delay_ms`,
    `error` and `crash` act as the options of those names do, for this call only (so
    that a script can make its changes, then fail)."""

    text: str = ""
    tool_calls: list[ScriptedCall] | None = None
    delay_ms: int = 0
    error: ScriptedError | None = None
    crash: str | None = None


class ScriptedOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    reply: str | None = None
    delay_ms: int = 0
    chunks: list[str] | None = None
    chunk_delay_ms: int = 0
    error: ScriptedError | None = None
    crash: str | None = None
    script: list[ScriptedTurn] | None = None
    spawn: list[str] | None = None


CRASH_KINDS = ("exit", "signal", "hang")


def parse_options(raw: dict[str, Any]) -> ScriptedOptions:
    """Validate `backend_opts`; a bad one is a config error of the run."""
    try:
        options = msgspec.convert(raw, ScriptedOptions)
    except msgspec.ValidationError as exc:
        raise LLMError("config", f"scripted backend_opts: {exc}") from None
    turns = options.script or []
    if any(crash is not None and crash not in CRASH_KINDS for crash in [options.crash, *(t.crash for t in turns)]):
        raise LLMError("config", f"scripted backend_opts.crash must be one of {', '.join(CRASH_KINDS)}")
    if options.delay_ms < 0 or options.chunk_delay_ms < 0 or any(t.delay_ms < 0 for t in turns):
        raise LLMError("config", "scripted delays must be >= 0")
    return options


async def complete(request: LLMRequest, call_index: int, on_delta: OnDelta, host: Host) -> LLMReply:
    options = _for_call(parse_options(request.backend_opts), call_index)
    if options.spawn:
        try:
            host.spawn(options.spawn)  # left running on purpose: the run's teardown must kill it
        except HostRefused as refused:
            raise LLMError("config", f"scripted `spawn`: {refused}") from None
    if options.crash is not None:
        await host.crash(options.crash)
    return await _answer(request, call_index, on_delta, options)


def _for_call(options: ScriptedOptions, call_index: int) -> ScriptedOptions:
    """The options of LLM call `call_index`: a script's turn may bring its own."""
    if options.script is None or call_index >= len(options.script):
        return options
    turn = options.script[call_index]
    return msgspec.structs.replace(options, delay_ms=turn.delay_ms or options.delay_ms, error=turn.error or options.error,
                                   crash=turn.crash or options.crash)


async def _answer(request: LLMRequest, call_index: int, on_delta: OnDelta, options: ScriptedOptions) -> LLMReply:
    if options.delay_ms:
        await trio.sleep(options.delay_ms / 1000)
    if options.error is not None:
        e = options.error
        raise LLMError(e.category, e.message, e.retryable, e.details)
    if options.script is not None:
        return await _scripted_turn(options, call_index, on_delta)
    text = options.reply if options.reply is not None else _last_user_message(request)
    if options.chunks is not None:
        for chunk in options.chunks:
            if options.chunk_delay_ms:
                await trio.sleep(options.chunk_delay_ms / 1000)
            await on_delta(chunk)
        text = options.reply if options.reply is not None else "".join(options.chunks)
    return _reply(text, request)


async def _scripted_turn(options: ScriptedOptions, call_index: int, on_delta: OnDelta) -> LLMReply:
    script = options.script or []
    if call_index >= len(script):
        raise LLMError("config", f"scripted script has {len(script)} turns; call {call_index + 1} has none")
    turn = script[call_index]
    if turn.text:
        await on_delta(turn.text)  # a model streams its text, before its tool calls too
    if turn.tool_calls is not None:
        calls = [
            ToolCall(
                id=f"call_{call_index}_{n}",
                name=call.name,
                arguments=call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments),
            )
            for n, call in enumerate(turn.tool_calls)
        ]
        return LLMReply(text=turn.text, tool_calls=calls, finish_reason="tool_calls", model="scripted")
    return LLMReply(text=turn.text, finish_reason="stop", model="scripted", usage=_usage(turn.text))


def _reply(text: str, request: LLMRequest) -> LLMReply:
    return LLMReply(text=text, finish_reason="stop", usage=_usage(text), model=request.model or "scripted")


def _usage(text: str) -> Usage:
    completion = len(text.split())
    return Usage(prompt_tokens=0, completion_tokens=completion, total_tokens=completion)


def _last_user_message(request: LLMRequest) -> str:
    for message in reversed(request.messages):
        if message.role == "user":
            return message.content
    return ""
