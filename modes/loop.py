"""The executor loop: drive a mode's run, doing the I/O its directives ask for.

`TurnTarget` is the run target of both executors (see supervisor.worker and
supervisor.inprocess): each hands it the spec, a way to emit progress events, and the
`Host` it runs on. Nothing here knows a mode's steps or which executor it runs under:
a mode's run turns events into directives (`modes.protocol`), this loop turns
directives into backend and tool calls and feeds their answers back, and what differs
between a worker and the daemon's own process is the host's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import trio

from genvisor.errors import LLMError
from genvisor.host import Host
from genvisor.limits import MAX_CHANNEL_FRAME
from genvisor.modes import scripted
from genvisor.modes.llm import (
    BackendConfig,
    Decision,
    Fed,
    LLMReplied,
    LLMReply,
    LLMRequest,
    RunFailed,
    RunOutcome,
    RunPaused,
    RunSpec,
    ToolsFinished,
)
from genvisor.modes.protocol import CallLLM, Commit, Fail, LLMFailed, RunTools, Start
from genvisor.modes.registry import registry
from genvisor.modes.tools import Workspace, call_tool
from genvisor.modes.workspace_snapshot import EFFECT_TOOLS, SnapshotError, SnapshotStore
from genvisor.types import ContextMessage, EventKind, GenerationEvent, ToolCall, ToolResult

Emit = Callable[[GenerationEvent], Awaitable[None]]
OnDelta = Callable[[str], Awaitable[None]]
Backend = Callable[[LLMRequest, int, OnDelta, Host], Awaitable[LLMReply]]
ToolCaller = Callable[[Workspace, ToolCall, list[str]], Awaitable[ToolResult]]


async def _scripted(request: LLMRequest, call_index: int, on_delta: OnDelta, host: Host) -> LLMReply:
    return await scripted.complete(request, call_index, on_delta, host)


async def _openai(request: LLMRequest, call_index: int, on_delta: OnDelta, host: Host) -> LLMReply:
    # Imported on first use (≈1 s); the zygote preloads it when such a backend is configured.
    from genvisor.modes import openai_backend

    return await openai_backend.complete(request, on_delta)


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What the loop may do for a run: the model backends by kind, and the tools. The
    host (what the run's process allows) comes from the executor, with each run."""

    backends: Mapping[str, Backend]
    call_tool: ToolCaller


BUILT_IN = Capabilities(backends={"scripted": _scripted, "openai": _openai}, call_tool=call_tool)

_spec_decoder = msgspec.msgpack.Decoder(RunSpec)
_encoder = msgspec.msgpack.Encoder()

# A run's outcome travels back to the daemon as one channel frame (the turn's tool
# messages included); headroom for the frame around it.
MAX_RESULT_BYTES = MAX_CHANNEL_FRAME - 64 * 1024

# Dry runs in the zygote: the first builds what a run builds lazily (msgspec's resolved
# types, trio's and the mode's caches); the next ones let CPython 3.11 finish
# specializing the bytecode, whose counters are writes — copy-on-write faults in every
# worker. 20 cut a worker's faults in its first run by ≈9% (865 → 786), ≈20 ms once.
PREPARE_DRY_RUNS = 20


class TurnTarget:
    """What a worker (or the in-process executor) runs: one turn of a conversation,
    with the built-in capabilities."""

    capabilities = BUILT_IN

    async def run(self, spec: msgspec.Raw, emit: Callable[[Any], Awaitable[None]], host: Host) -> RunOutcome:
        return within_result_limit(await drive(_spec_decoder.decode(spec), emit, host, self.capabilities))

    async def warm(self, host: Host) -> None:
        """A dry run through the scripted backend, events on: its first pass through
        the code is paid before a run, not during one (see supervisor.worker)."""
        request = LLMRequest([ContextMessage("user", "warm")], BackendConfig("scripted", "scripted"))
        spec = RunSpec(ref="warm", run_id="warm", conversation_id="warm", mode="coding", request_id="warm", request=request, events=True)

        async def discard(event: GenerationEvent) -> None:
            _encoder.encode(event)

        _encoder.encode(await drive(_spec_decoder.decode(_encoder.encode(spec)), discard, host, self.capabilities))

    def prepare(self, host: Host) -> None:
        """Run once in the zygote before it forks: read the mode registry's entry
        points, and make dry runs, so that what a run builds or writes first is done
        there and shared, not redone in every worker. A Trio run that has returned
        leaves no loop and, without `to_thread`, no thread behind, so the zygote may
        still fork."""
        registry()
        for _ in range(PREPARE_DRY_RUNS):
            trio.run(self.warm, host)


def within_result_limit(outcome: RunOutcome) -> RunOutcome:
    """`outcome`, or the run's failure if it is too large to hand back whole."""
    size = len(_encoder.encode(outcome))
    if size <= MAX_RESULT_BYTES:
        return outcome
    return RunFailed(LLMError(
        "unknown", f"the turn's result is {size} bytes, over the {MAX_RESULT_BYTES}-byte limit of a run's result "
                   "(its tool output is too large: ask for fewer or smaller tool calls)",
        retryable=False, details={"reason": "result_too_large", "bytes": size, "limit": MAX_RESULT_BYTES},
    ).info())


async def drive(spec: RunSpec, emit: Emit, host: Host, capabilities: Capabilities = BUILT_IN) -> RunOutcome:
    """Run `spec` to its outcome with `capabilities` on `host`. A bug or an unexpected
    value anywhere in the run is the run's failure, reported as such (cancellation
    still propagates)."""
    async with trio.open_nursery() as nursery:
        # Every run sends all its events: the daemon keeps them for `stream_events` and
        # partial output, and forwards them to the run's owner if asked to (`spec.events`).
        events = _Events(spec.ref, emit, nursery, coalesce_s=spec.coalesce_ms / 1000,
                         first_seq=spec.resume.first_seq if spec.resume is not None else 1)
        try:
            outcome = await _run(spec, events, host, capabilities)
        except Exception as exc:  # noqa: BLE001 — the run fails, with what went wrong
            outcome = RunFailed(LLMError("unknown", f"the run failed: {type(exc).__name__}: {exc}", retryable=False,
                                         details={"reason": "run_error", "exception": type(exc).__name__}).info())
        await events.close()
        nursery.cancel_scope.cancel()  # a window still to close has nothing left to send
    return outcome


async def _run(spec: RunSpec, events: _Events, host: Host, capabilities: Capabilities) -> RunOutcome:
    mode = registry().get(spec.mode)
    if mode is None:
        return RunFailed(LLMError("config", f"mode {spec.mode!r} is not registered here").info())
    run = mode.new_run(spec)
    workspace = None
    if spec.workspace is not None:
        workspace = Workspace(spec.workspace)
        await host.blocking(lambda: workspace.root.mkdir(parents=True, exist_ok=True))
    fed: list[Fed] = []  # what the run is fed after Start: a pause keeps it, to replay
    directive = run.feed(Start())
    resume = spec.resume
    if resume is None:
        await events.send("started")
        snapshotted, decisions = False, {}
    else:  # a paused run going on: replayed to where it paused, with no model or tool call
        for event in resume.fed:
            directive = run.feed(event)
            fed.append(event)
        snapshotted, decisions = resume.snapshotted, resume.decisions
    while True:
        if isinstance(directive, CallLLM):
            await events.send("step", step=directive.call_index)
            try:
                reply = await _call_backend(directive.request, directive.call_index, events, host, capabilities)
            except LLMError as error:
                directive = run.feed(LLMFailed(error.info()))
                continue
            fed.append(LLMReplied(reply))
            directive = run.feed(fed[-1])
        elif isinstance(directive, RunTools):
            asks = [call.id for call in directive.calls if spec.approvals.get(call.name) == "ask" and call.id not in decisions]
            if asks:  # before any call of the batch runs: on the answers, it runs whole
                return RunPaused(fed, directive.calls, asks, snapshotted)
            results = []
            enabled = [tool.name for tool in spec.request.tools] if spec.request else []
            if not snapshotted and workspace is not None and spec.snapshot_store is not None and any(
                call.name in EFFECT_TOOLS and call.name in enabled for call in directive.calls
            ):
                failure = await _on_snapshots(lambda: _snapshots(spec, workspace).snapshot(spec.run_id), host,
                                              "could not snapshot the workspace before its first change")
                if isinstance(failure, RunFailed):
                    return failure
                snapshotted = True
            for call in directive.calls:
                await events.send("tool_call", tool_call=call)
                if (refusal := _refusal(spec, call, decisions)) is not None:
                    result = ToolResult(call.id, call.name, refusal, is_error=True)
                elif workspace is None:
                    result = ToolResult(call.id, call.name, "no workspace is configured for this conversation", is_error=True)
                else:
                    result = await capabilities.call_tool(workspace, call, enabled)
                await events.send("tool_result", tool_result=result)
                results.append(result)
            fed.append(ToolsFinished(results))
            directive = run.feed(fed[-1])
        elif isinstance(directive, Commit):
            outcome = directive.outcome
            if snapshotted and workspace is not None:
                # The turn's change set is its completion artifact: recorded now, kept
                # by the daemon once the turn is committed.
                changes = await _on_snapshots(lambda: _snapshots(spec, workspace).record(spec.run_id, spec.run_id, spec.ref),
                                              host, "could not record the turn's changes to the workspace")
                if isinstance(changes, RunFailed):
                    return changes
                outcome = msgspec.structs.replace(outcome, result=msgspec.structs.replace(outcome.result, changes=changes))
            return outcome  # its `completed` event is the daemon's, once the turn is committed
        else:
            assert isinstance(directive, Fail)
            return RunFailed(directive.error)


def _refusal(spec: RunSpec, call: ToolCall, decisions: dict[str, Decision]) -> str | None:
    """Why `call` may not run (what the model is told), or None: it may."""
    policy = spec.approvals.get(call.name, "allow")
    if policy == "deny":
        return f"{call.name} is not allowed in this conversation (its approval policy is deny)"
    decision = decisions.get(call.id)
    if policy == "ask" and decision is not None and not decision.approve:
        return f"the user denied this {call.name} call" + (f": {decision.note}" if decision.note else "")
    return None


def _snapshots(spec: RunSpec, workspace: Workspace) -> SnapshotStore:
    assert spec.snapshot_store is not None
    return SnapshotStore(Path(spec.snapshot_store), workspace.root, spec.snapshot_excludes)


async def _on_snapshots(work: Callable[[], Any], host: Host, failing: str) -> Any:
    """`work` on the workspace's snapshots, or the run's failure if it cannot be done:
    a run that could not be undone does not go on changing the workspace."""
    try:
        return await host.blocking(work)
    except (SnapshotError, OSError) as exc:
        return RunFailed(LLMError("unknown", f"{failing}: {exc}", retryable=False, details={"reason": "snapshot_failed"}).info())


async def _call_backend(request: LLMRequest, call_index: int, events: _Events, host: Host, capabilities: Capabilities) -> LLMReply:
    async def on_delta(text: str) -> None:
        if not isinstance(text, str):  # built from what a model server sent: checked like a reply
            raise LLMError("provider", f"backend {request.backend.name!r} streamed a malformed delta: {type(text).__name__}",
                           retryable=False, details={"reason": "malformed_reply"})
        await events.send("delta", text=text)

    backend = capabilities.backends.get(request.backend.kind)
    if backend is None:
        raise LLMError("config", f"backend kind {request.backend.kind!r} is not available")
    return checked_reply(await backend(request, call_index, on_delta, host), request.backend.name)


def checked_reply(reply: LLMReply, backend: str) -> LLMReply:
    """`reply` with every field of the type the run's types promise. A backend builds
    its reply from what a model server sent, and Struct construction does not check
    types: a `"model": 123` would otherwise travel on and fail far from its cause."""
    try:
        return msgspec.convert(msgspec.to_builtins(reply), LLMReply)
    except (msgspec.ValidationError, TypeError) as exc:
        raise LLMError("provider", f"backend {backend!r} sent a malformed reply: {exc}", retryable=False,
                       details={"reason": "malformed_reply"}) from None


class _Events:
    """A run's events, numbered in order. A text delta goes at once, unless another went
    less than `coalesce_s` ago: then it waits for that window to close, and the deltas
    that came meanwhile travel as one delta event, their texts joined (the window also
    closes at the next event of another kind). A lone delta is never held, and costs no
    timer; a burst costs one event per window."""

    def __init__(self, ref: str, emit: Emit, nursery: trio.Nursery, *, coalesce_s: float, first_seq: int = 1) -> None:
        self._ref = ref
        self._emit = emit
        self._nursery = nursery
        self._coalesce_s = coalesce_s
        self._seq = first_seq - 1
        self._pending: list[str] = []  # delta texts held for the window
        self._window_ends = -math.inf  # a delta sent before then holds the next ones back
        self._lock = trio.Lock()  # one event at a time: a window closing must not overtake a send

    async def send(self, kind: EventKind, **fields: Any) -> None:
        if kind == "delta" and self._coalesce_s > 0:
            if self._pending:
                self._pending.append(fields["text"])
                return
            now = trio.current_time()
            if now < self._window_ends:
                self._pending.append(fields["text"])
                self._nursery.start_soon(self._close_window)
                return
            self._window_ends = now + self._coalesce_s
        async with self._lock:
            await self._flush()
            await self._put(kind, **fields)

    async def close(self) -> None:
        """Send what the window still holds (the run is ending)."""
        async with self._lock:
            await self._flush()

    async def _close_window(self) -> None:
        await trio.sleep_until(self._window_ends)
        async with self._lock:
            if self._pending:  # what it held goes now, and opens the next window
                self._window_ends = trio.current_time() + self._coalesce_s
            await self._flush()

    async def _flush(self) -> None:
        if self._pending:
            text, self._pending = "".join(self._pending), []
            await self._put("delta", text=text)

    async def _put(self, kind: EventKind, **fields: Any) -> None:
        self._seq += 1
        await self._emit(GenerationEvent(ref=self._ref, kind=kind, seq=self._seq, **fields))
