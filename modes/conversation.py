"""The conversation model: an append-only journal and derived state as a pure fold.

`fold(entries)` and `apply(state, entry)` are the only ways state comes to be, so
replaying any prefix of a journal gives the state the conversation had then.
"""

from __future__ import annotations

from typing import Any

import msgspec

from genvisor.modes.tools import DEFAULT_SKILLS
from genvisor.types import DerivedState, JournalEntry, LLMConfig, Message, RunInfo

RUN_HISTORY_LIMIT = 20


def initial_state() -> DerivedState:
    """A new conversation: idle, in `coding`, with the default skills profile."""
    return DerivedState(skills=list(DEFAULT_SKILLS))


def fold(entries: list[JournalEntry], state: DerivedState | None = None) -> DerivedState:
    state = state or initial_state()
    for entry in entries:
        state = apply(state, entry)
    return state


def apply(state: DerivedState, entry: JournalEntry) -> DerivedState:
    replace = msgspec.structs.replace
    if entry.kind == "message":
        message = Message(entry.entry_id, entry.seq, entry.role, entry.content or "", entry.data)  # type: ignore[arg-type]  # a message entry has its role
        state = replace(state, messages=[*state.messages, message])
        if entry.role == "user":
            return replace(state, status="pending_llm", turn=state.turn + 1, last_user_message=entry.content)
        if entry.role == "assistant":
            return replace(state, status="responding")
        return state
    data = entry.data
    if entry.event == "cancel_requested":
        return replace(state, status="canceled", cancel_requested=True, cancel_reason=data.get("reason"))
    if entry.event == "run_started":
        run = RunInfo(run_id=data["run_id"], mode=data.get("mode", state.mode), status="running", step="llm_request", started_at=entry.at)
        return replace(state, active_run=run)
    if entry.event in ("approval_requested", "run_resumed") and state.active_run is not None:
        paused = entry.event == "approval_requested"
        return replace(state, active_run=replace(state.active_run, status="awaiting_approval" if paused else "running",
                                                  step="awaiting_approval" if paused else "execute_tools"))
    if entry.event == "run_finished":
        active = state.active_run
        if active is None or active.run_id != data["run_id"]:
            return state
        done = replace(active, status=data["status"], step=None, finished_at=entry.at, reason=data.get("reason"))
        return replace(state, active_run=None, run_history=[done, *state.run_history][:RUN_HISTORY_LIMIT])
    if entry.event == "llm_configured":
        return replace(state, llm=_merge_llm(state.llm, data))
    if entry.event == "skills_configured":
        return replace(state, skills=list(data.get("skills", [])))
    if entry.event in ("mode_configured", "mode_switch_accepted"):
        return replace(state, mode=data.get("mode", state.mode), mode_state=dict(data.get("mode_state") or {}))
    return state


def _merge_llm(current: LLMConfig, data: dict[str, Any]) -> LLMConfig:
    def pick(key: str) -> str | None:
        value = data.get(key)
        picked: str | None = getattr(current, key) if value is None else value  # None keeps; "" is a value
        return picked

    return LLMConfig(
        backend=pick("backend"),
        provider=pick("provider"),
        model=pick("model"),
        options=deep_merge(current.options, data.get("options") or {}),
    )


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
