"""The `openai` backend: any server that speaks the OpenAI chat-completions wire format.

It uses the official SDK's async client (it runs under Trio), never retries on its
own (a retry is the caller's decision: `LLMError.retryable` says when it makes
sense), streams deltas when asked, assembles streamed tool calls, and maps every
failure onto CONTRACT §9:

    401/403 → auth · request timeout → timeout · 429, 5xx → provider (retryable)
    other 4xx → provider (not retryable) · connection refused/reset, bad TLS,
    malformed stream → transport · anything else → unknown

with the HTTP status and the provider's error code in `details`. The API key comes
only from the environment variable the backend's config names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import openai

from genvisor.errors import LLMError
from genvisor.modes.llm import LLMReply, LLMRequest
from genvisor.types import ContextMessage, ToolCall, Usage

OnDelta = Callable[[str], Awaitable[None]]


async def complete(request: LLMRequest, on_delta: OnDelta) -> LLMReply:
    settings = request.backend.settings
    base_url = settings.get("base_url")
    if not base_url:
        raise LLMError("config", f"backend {request.backend.name!r} has no base_url")
    if not request.model:
        raise LLMError("config", f"backend {request.backend.name!r}: no model (set it in the backend, the conversation or the call)")
    key_env = settings.get("api_key_env")
    api_key = os.environ.get(key_env, "") if key_env else ""
    if key_env and not api_key:
        raise LLMError("auth", f"the environment variable {key_env} (backend {request.backend.name!r}) is not set")
    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key=api_key or "unused",  # local servers often take any key
        timeout=request.timeout_ms / 1000,
        max_retries=0,
    )
    arguments = _arguments(request)
    try:
        async with client:
            if request.stream:
                return await _streamed(client, arguments, on_delta)
            response = await client.chat.completions.create(**arguments)
            return _reply(response)
    except openai.APIStatusError as exc:
        raise _status_error(exc) from None
    except openai.APITimeoutError:
        raise LLMError("timeout", f"no answer within {request.timeout_ms} ms", details={"timeout_ms": request.timeout_ms}) from None
    except openai.APIConnectionError as exc:
        raise LLMError("transport", f"connection failed: {exc.__cause__ or exc}", details={"base_url": base_url}) from None
    except (openai.APIError, json.JSONDecodeError, ValueError) as exc:
        raise LLMError("transport", f"malformed response: {exc}") from None
    except (AttributeError, TypeError, KeyError, IndexError) as exc:
        # The SDK builds its response objects without checking them: a body of the
        # wrong shape surfaces here, as we read it.
        raise LLMError("provider", f"the model server sent a malformed reply: {type(exc).__name__}: {exc}", retryable=False,
                       details={"reason": "malformed_reply"}) from None


def _arguments(request: LLMRequest) -> dict[str, Any]:
    arguments: dict[str, Any] = {**request.request_options, "model": request.model, "messages": [_message(m) for m in request.messages]}
    if request.tools:
        arguments["tools"] = [
            {"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.parameters}} for t in request.tools
        ]
    if request.max_tokens is not None:
        arguments["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        arguments["temperature"] = request.temperature
    return arguments


def _message(message: ContextMessage) -> dict[str, Any]:
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.metadata.get("tool_call_id", ""), "content": message.content}
    calls = message.metadata.get("tool_calls") if message.role == "assistant" else None
    if calls:
        return {
            "role": "assistant",
            "content": message.content or None,
            "tool_calls": [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls],
        }
    return {"role": message.role, "content": message.content}


def _reply(response: Any) -> LLMReply:
    if not response.choices:
        raise LLMError("transport", "malformed response: no choices")
    choice = response.choices[0]
    calls = [ToolCall(c.id, c.function.name, c.function.arguments or "") for c in (choice.message.tool_calls or [])]
    return LLMReply(
        text=choice.message.content or "",
        tool_calls=calls,
        finish_reason=choice.finish_reason,
        usage=_usage(response.usage),
        model=response.model,
        metadata={"response_id": response.id},
    )


async def _streamed(client: openai.AsyncOpenAI, arguments: dict[str, Any], on_delta: OnDelta) -> LLMReply:
    stream = await client.chat.completions.create(**arguments, stream=True, stream_options={"include_usage": True})
    text: list[str] = []
    calls: dict[int, dict[str, str]] = {}  # index → id, name, arguments (assembled from pieces)
    finish_reason = None
    usage = Usage()
    model = response_id = None
    finished = False
    async for chunk in stream:
        model, response_id = chunk.model or model, chunk.id or response_id
        if chunk.usage is not None:
            usage = _usage(chunk.usage)
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                text.append(delta.content)
                await on_delta(delta.content)
            for piece in delta.tool_calls or []:
                call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = piece.id or call["id"]
                if piece.function is not None:
                    call["name"] = piece.function.name or call["name"]
                    call["arguments"] += piece.function.arguments or ""
            if choice.finish_reason:
                finish_reason, finished = choice.finish_reason, True
    if not finished:
        raise LLMError("transport", "malformed stream: it ended without a finish reason")
    tool_calls = [ToolCall(c["id"] or f"call_{i}", c["name"], c["arguments"]) for i, c in sorted(calls.items())]
    return LLMReply(
        text="".join(text), tool_calls=tool_calls, finish_reason=finish_reason, usage=usage, model=model, metadata={"response_id": response_id}
    )


def _usage(usage: Any) -> Usage:
    if usage is None:
        return Usage()
    return Usage(usage.prompt_tokens or 0, usage.completion_tokens or 0, usage.total_tokens or 0)


def _status_error(exc: openai.APIStatusError) -> LLMError:
    status = exc.status_code
    details: dict[str, Any] = {"status": status}
    if exc.code is not None:
        details["code"] = exc.code
    message = f"HTTP {status}: {_provider_message(exc)}"
    if status in (401, 403):
        return LLMError("auth", message, details=details)
    if status == 429 or status >= 500:
        return LLMError("provider", message, retryable=True, details=details)
    return LLMError("provider", message, retryable=False, details=details)


def _provider_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(message := inner.get("message"), str):
            return message
    return exc.message
