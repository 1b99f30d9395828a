"""The `coding` mode as a sans-I/O step graph.

A `CodingRun` is a state machine in the style of h11 (see `modes.protocol`): feed it
what happened (`Start`, `LLMReplied`, `LLMFailed`, `ToolsFinished`), get back the next
directive (`CallLLM`, `RunTools`, `Commit`, `Fail`). It performs no I/O; executors do.

    assemble_context ─▶ llm_request ──(tool calls)──▶ execute_tools ─┐
                           ▲                                          │
                           └──────────── feed_tool_results ◀──────────┘
                       llm_request ──(text)──▶ commit
"""

from __future__ import annotations

import time
from typing import Any, get_args

import msgspec

from genvisor.errors import Diagnostic, LLMError
from genvisor.modes.assemble import build_run_spec
from genvisor.modes.llm import DEFAULT_MAX_STEPS, DEFAULT_MAX_TOOL_CALLS, Approval, LLMReply, RunSpec, RunSucceeded
from genvisor.modes.protocol import (
    AssemblyRequest,
    CallLLM,
    Commit,
    Directive,
    Event,
    Fail,
    LLMFailed,
    LLMReplied,
    OptionSchema,
    RunTools,
    Start,
    ToolsFinished,
    Transitions,
    check_options,
)
from genvisor.modes.tools import SPECS
from genvisor.types import ContextMessage, LLMResult, ModeInfo, ToolResult, Usage

# Which events each step accepts (the graph above, as data).
STEPS: dict[str, tuple[type, ...]] = {
    "assemble_context": (Start,),
    "llm_request": (LLMReplied, LLMFailed),
    "execute_tools": (ToolsFinished,),
    "done": (),
}


class CodingRun:
    def __init__(self, spec: RunSpec) -> None:
        self.spec = spec
        self._steps = Transitions(STEPS, "assemble_context")
        self._calls = 0
        self._tool_calls = 0
        self._transcript: list[ContextMessage] = []  # tool traffic of this turn
        self._usage = Usage()
        self._started = time.monotonic()
        self._tool_trace: list[dict[str, str | bool]] = []

    @property
    def step(self) -> str:
        return self._steps.step

    def feed(self, event: Event) -> Directive:
        self._steps.enter(event)
        if isinstance(event, Start):
            return self._start()
        if isinstance(event, LLMReplied):
            return self._replied(event.reply)
        if isinstance(event, LLMFailed):
            return self._done(Fail(event.error))
        assert isinstance(event, ToolsFinished)
        return self._tools_finished(event.results)

    def _done(self, directive: Directive) -> Directive:
        self._steps.step = "done"
        return directive

    def _start(self) -> Directive:
        if self.spec.request is None:
            return self._done(Fail(self.spec.error or LLMError("config", "no request could be assembled").info()))
        return self._call_llm()

    def _replied(self, reply: LLMReply) -> Directive:
        self._usage = _add(self._usage, reply.usage)
        if not reply.tool_calls:
            return self._final(reply)
        if self._calls >= self.spec.max_steps:
            return self._done(Fail(LLMError("unknown", f"step budget of {self.spec.max_steps} LLM calls exhausted").info()))
        self._tool_calls += len(reply.tool_calls)
        if self._tool_calls > self.spec.max_tool_calls:
            return self._done(Fail(LLMError("unknown", f"tool-call budget of {self.spec.max_tool_calls} calls exhausted").info()))
        self._transcript.append(
            ContextMessage("assistant", reply.text, {"tool_calls": [msgspec.to_builtins(c) for c in reply.tool_calls]})
        )
        self._steps.step = "execute_tools"
        return RunTools(reply.tool_calls)

    def _final(self, reply: LLMReply) -> Directive:
        """A reply with no tool call ends the turn: coding commits it (another mode may
        check it first, and go on)."""
        return self._done(Commit(self._success(reply)))

    def _tools_finished(self, results: list[ToolResult]) -> Directive:
        for result in results:
            self._transcript.append(
                ContextMessage("tool", result.content, {"tool_call_id": result.call_id, "name": result.name, "is_error": result.is_error})
            )
            self._tool_trace.append({"call_id": result.call_id, "name": result.name, "is_error": result.is_error})
        return self._call_llm()

    def _call_llm(self) -> CallLLM:
        request = self.spec.request
        assert request is not None
        if turn := self._turn_so_far():
            request = msgspec.structs.replace(request, messages=[*request.messages, *turn])
        self._steps.step = "llm_request"
        index = self._calls
        self._calls += 1
        return CallLLM(request, index)

    def _turn_so_far(self) -> list[ContextMessage]:
        """What this turn adds to the context of its next LLM call: its tool traffic."""
        return self._transcript

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


class CodingMode:
    info = ModeInfo(
        id="coding",
        summary="Assemble context, call the model, run its tool calls, feed results back, commit the reply.",
        capabilities=["llm", "tools", "streaming", "cancel"],
        required_options=[],
        optional_options=["max_steps", "max_tool_calls", "system_prompt", "approvals"],
        defaults={"max_steps": DEFAULT_MAX_STEPS, "max_tool_calls": DEFAULT_MAX_TOOL_CALLS, "system_prompt": None,
                  "approvals": {"run_command": "ask"}},
        stability="stable",
        version="1",
    )
    _options: OptionSchema = {"max_steps": (1, 256), "max_tool_calls": (1, 256), "system_prompt": str, "approvals": dict}

    def validate(self, mode_state: dict[str, Any]) -> list[Diagnostic]:
        problems = check_options("coding", mode_state, self._options)
        approvals = mode_state.get("approvals", {})
        if not isinstance(approvals, dict):
            return problems  # said by check_options
        for tool, policy in approvals.items():
            if tool not in SPECS:
                problems.append(Diagnostic("unknown_tool", f"/approvals/{tool}", f"no tool {tool!r} (tools: {', '.join(SPECS)})"))
            elif policy not in get_args(Approval):
                problems.append(Diagnostic("invalid_value", f"/approvals/{tool}", f"{tool}'s approval must be allow, ask or deny"))
        return problems

    def assemble(self, request: AssemblyRequest) -> RunSpec:
        return build_run_spec(request)

    def new_run(self, spec: RunSpec) -> CodingRun:
        return CodingRun(spec)
