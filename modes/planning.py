"""The `planning` mode: given a goal, produce a structured plan — phases of tasks, each
with an id, a status and acceptance criteria — validated against `Plan`.

Its graph differs from coding's: a reply is not the end but a candidate, checked
against the schema; one that does not validate goes back to the model with what is
wrong, a bounded number of times, and then fails the run with a typed error. The model
may look around first with the read-only tools (never a write: a plan changes nothing).

    assemble_context ─▶ llm_request ──(tool calls)──▶ execute_tools ──▶ llm_request
                        llm_request ──(text)──▶ validate_plan
                      validate_plan ──(valid)──▶ commit: the plan, as an artifact
                      validate_plan ──(invalid, retries left)──▶ llm_request (told what is wrong)
                      validate_plan ──(invalid, none left)──▶ fail: LLMError provider, invalid_plan
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from genvisor.errors import Diagnostic, LLMError
from genvisor.modes.assemble import build_run_spec
from genvisor.modes.coding import CodingRun
from genvisor.modes.llm import DEFAULT_MAX_STEPS, Artifact, LLMReply, RunSpec
from genvisor.modes.protocol import AssemblyRequest, Commit, Directive, Fail, OptionSchema, check_options
from genvisor.types import ContextMessage, JournalEntry, ModeInfo, Plan, PlanRecord

READ_ONLY_TOOLS = frozenset({"read_file", "list_dir", "search_text"})
DEFAULT_MAX_RETRIES = 2

SYSTEM_PROMPT = """You are planning, not doing: change nothing. Given the user's goal, reply with one JSON object
and nothing else, of this shape:
{"goal": "...", "phases": [{"id": "P1", "title": "...", "tasks": [{"id": "P1.T1", "title": "...",
"status": "todo", "acceptance": ["how we will know it is done", "..."]}]}]}
status is one of todo, in_progress, done, blocked. Every id is unique. Every phase has at least one task and
every task at least one acceptance criterion. You may read the workspace with the tools first."""

_plan_decoder = msgspec.json.Decoder(Plan)
_FENCE = re.compile(r"^\s*```(?:json)?\s*\n(.*?)\n\s*```\s*$", re.DOTALL)


def parse_plan(text: str) -> Plan:
    """The plan in a model's reply (bare JSON, or JSON in one fenced block); raises
    ValueError saying what is wrong, in words a model can act on."""
    fenced = _FENCE.match(text)
    body = fenced.group(1) if fenced else text.strip()
    try:
        plan = _plan_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise ValueError(f"the plan does not match the schema: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ValueError(f"the reply is not a JSON object: {exc}") from None
    ids = [phase.id for phase in plan.phases] + [task.id for phase in plan.phases for task in phase.tasks]
    if duplicates := sorted({i for i in ids if ids.count(i) > 1}):
        raise ValueError(f"ids must be unique; repeated: {', '.join(duplicates)}")
    return plan


def plans_in(journal: list[JournalEntry]) -> list[PlanRecord]:
    """The plans a conversation's planning turns committed (its `artifact_recorded`
    notes of kind "plan"), oldest first."""
    return [
        PlanRecord(e.data["ref"], e.data["run_id"], e.at, msgspec.convert(e.data["data"], Plan))
        for e in journal
        if e.event == "artifact_recorded" and e.data.get("kind") == "plan"
    ]


class PlanningRun(CodingRun):
    """Coding's tool loop (with read-only tools), but a final reply is a candidate plan:
    checked against `Plan`; one that does not validate is fed back to the model with
    what is wrong, at most `max_retries` times, then the run fails."""

    def __init__(self, spec: RunSpec) -> None:
        super().__init__(spec)
        self._retries_left = int(spec.mode_options.get("max_retries", DEFAULT_MAX_RETRIES))
        self._feedback: list[ContextMessage] = []  # rejected plans and why: for the model, not the journal

    def _turn_so_far(self) -> list[ContextMessage]:
        return [*self._transcript, *self._feedback]

    def _final(self, reply: LLMReply) -> Directive:
        try:
            plan = parse_plan(reply.text)
        except ValueError as problem:
            return self._rejected(reply, str(problem))
        text = plan.as_text()  # the assistant message: the plan as a person reads it
        outcome = self._success(msgspec.structs.replace(reply, text=text))
        return self._done(Commit(msgspec.structs.replace(outcome, artifacts=[Artifact("plan", msgspec.to_builtins(plan))])))

    def _rejected(self, reply: LLMReply, problem: str) -> Directive:
        if self._retries_left <= 0:
            return self._done(Fail(LLMError(
                "provider", f"the model's plan did not validate: {problem}", retryable=True,
                details={"reason": "invalid_plan", "problem": problem[:2_000]},
            ).info()))
        self._retries_left -= 1
        # The rejected reply and why, as the next call's last messages: the model sees its mistake.
        self._feedback.extend([
            ContextMessage("assistant", reply.text[:20_000]),
            ContextMessage("user", f"That plan was rejected: {problem}. Reply with the corrected JSON plan only."),
        ])
        return self._call_llm()


class PlanningMode:
    info = ModeInfo(
        id="planning",
        summary="Turn a goal into a validated plan: phases of tasks with ids, status and acceptance criteria.",
        capabilities=["llm", "tools", "artifacts", "cancel"],
        required_options=[],
        optional_options=["max_retries", "max_steps", "system_prompt"],
        defaults={"max_retries": DEFAULT_MAX_RETRIES, "max_steps": DEFAULT_MAX_STEPS, "system_prompt": None},
        stability="experimental",
        version="1",
    )
    _options: OptionSchema = {"max_retries": (0, 5), "max_steps": (1, 256), "system_prompt": str}

    def validate(self, mode_state: dict[str, Any]) -> list[Diagnostic]:
        return check_options("planning", mode_state, self._options)

    def assemble(self, request: AssemblyRequest) -> RunSpec:
        spec = build_run_spec(request, tools=READ_ONLY_TOOLS, system_prompt=SYSTEM_PROMPT)
        retries = request.state.mode_state.get("max_retries", DEFAULT_MAX_RETRIES)
        return msgspec.structs.replace(spec, mode_options={"max_retries": retries})

    def new_run(self, spec: RunSpec) -> PlanningRun:
        return PlanningRun(spec)
