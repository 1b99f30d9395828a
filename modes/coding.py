"""The `coding` mode as a sans-I/O step graph.

A `CodingRun` is a state machine in the style of h11: feed it what happened
(`start`, `llm_replied`, `llm_failed`, `tools_finished`), get back the next directive
(`CallLLM`, `RunTools`, `Commit`, `Fail`). It performs no I/O; executors do.

    assemble_context ─▶ llm_request ──(tool calls)──▶ execute_tools ─┐
                           ▲                                          │
                           └──────────── feed_tool_results ◀──────────┘
                       llm_request ──(text)──▶ commit
"""

from __future__ import annotations

import time

import msgspec

from genvisor.errors import ErrorInfo, LLMError
from genvisor.modes.llm import LLMReply, LLMRequest, RunSpec, RunSucceeded
from genvisor.types import ContextMessage, LLMResult, ToolCall, ToolResult, Usage


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

# The transition table: which inputs each step accepts.
_ACCEPTS = {
    "assemble_context": {"start"},
    "llm_request": {"llm_replied", "llm_failed"},
    "execute_tools": {"tools_finished"},
    "done": set(),
}


class ProtocolViolation(Exception):
    """An executor fed the machine an input its current step does not accept."""


class CodingRun:
    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self.step = "assemble_context"
        self._calls = 0
        self._tool_calls = 0
        self._transcript: list[ContextMessage] = []  # tool traffic of this turn
        self._usage = Usage()
        self._started = time.monotonic()
        self._tool_trace: list[dict[str, str | bool]] = []

    def _enter(self, event: str) -> None:
        if event not in _ACCEPTS[self.step]:
            raise ProtocolViolation(f"{event!r} is not accepted in step {self.step!r}")

    def start(self) -> Directive:
        self._enter("start")
        if self.spec.request is None:
            self.step = "done"
            return Fail(self.spec.error or LLMError("config", "no request could be assembled").info())
        return self._call_llm()

    def llm_replied(self, reply: LLMReply) -> Directive:
        self._enter("llm_replied")
        self._usage = _add(self._usage, reply.usage)
        if reply.tool_calls:
            if self._calls >= self.spec.max_steps:
                self.step = "done"
                return Fail(LLMError("unknown", f"step budget of {self.spec.max_steps} LLM calls exhausted").info())
            self._tool_calls += len(reply.tool_calls)
            if self._tool_calls > self.spec.max_tool_calls:
                self.step = "done"
                return Fail(LLMError("unknown", f"tool-call budget of {self.spec.max_tool_calls} calls exhausted").info())
            self._transcript.append(
                ContextMessage("assistant", reply.text, {"tool_calls": [msgspec.to_builtins(c) for c in reply.tool_calls]})
            )
            self.step = "execute_tools"
            return RunTools(reply.tool_calls)
        self.step = "done"
        return Commit(self._success(reply))

    def llm_failed(self, error: LLMError) -> Directive:
        self._enter("llm_failed")
        self.step = "done"
        return Fail(error.info())

    def tools_finished(self, results: list[ToolResult]) -> Directive:
        self._enter("tools_finished")
        for result in results:
            self._transcript.append(
                ContextMessage("tool", result.content, {"tool_call_id": result.call_id, "name": result.name, "is_error": result.is_error})
            )
            self._tool_trace.append({"call_id": result.call_id, "name": result.name, "is_error": result.is_error})
        return self._call_llm()

    def _call_llm(self) -> CallLLM:
        request = self.spec.request
        assert request is not None
        if self._transcript:
            request = msgspec.structs.replace(request, messages=[*request.messages, *self._transcript])
        self.step = "llm_request"
        index = self._calls
        self._calls += 1
        return CallLLM(request, index)

    def _success(self, reply: LLMReply) -> RunSucceeded:
        spec = self.spec
        assert spec.request is not None
        request = spec.request
        model = reply.model or request.model
        llm_metadata = {
            **reply.metadata,
            "timings": {"run_ms": round((time.monotonic() - self._started) * 1000, 3)},
            "llm_calls": self._calls,
            "tool_trace": self._tool_trace,
        }
        result = LLMResult(
            request_id=spec.request_id,
            conversation_id=spec.conversation_id,
            backend=request.backend.name,
            text=reply.text,
            model=model,
            provider=request.provider,
            finish_reason=reply.finish_reason,
            usage=self._usage,
            metadata=llm_metadata,
        )
        metadata = {
            "request_id": spec.request_id,
            "backend": request.backend.name,
            "provider": request.provider,
            "model": model,
            "finish_reason": reply.finish_reason,
            "usage": msgspec.to_builtins(self._usage),
            "llm_metadata": llm_metadata,
            "run_id": spec.run_id,
            **spec.record_metadata,
        }
        reply_message = ContextMessage("assistant", reply.text, metadata)
        return RunSucceeded(result=result, messages=[*self._transcript, reply_message])


def _add(a: Usage, b: Usage) -> Usage:
    return Usage(a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens, a.total_tokens + b.total_tokens)
