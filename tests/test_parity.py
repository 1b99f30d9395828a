"""The parity matrix: every baseline scenario on every executor, same behaviour.

Rows are scenarios; columns are executors — `in_process` (the embedded daemon, runs
in tasks of this process), `worker_process` (a real daemon, a fresh worker process
per run) and `ray` (a real daemon whose runs go to a two-node Ray cluster, a fresh
worker per run on a node). Each scenario drives a `Client` and returns a *signature*:
outcome, message history, status, the owner's notifications and the telemetry counts
it caused. A cell passes when its signature equals the row's expected one, so the
columns agree.
"""

from __future__ import annotations

import collections
import itertools
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import wait_until
from genvisor.client import Client
from genvisor.errors import GenerationCanceled, GenvisorError, LLMError
from genvisor.types import GenerationCanceled as CanceledNote, GenerationResult

SLOW = {"backend_opts": {"delay_ms": 60_000}}
_ids = itertools.count(1)


def _outcome(call: Callable[[], Any]) -> Any:
    try:
        result = call()
    except LLMError as exc:
        return ("LLMError", exc.category, exc.message)
    except GenerationCanceled as exc:
        return ("GenerationCanceled", exc.reason)
    except GenvisorError as exc:
        return (type(exc).__name__,)
    if isinstance(result, tuple):  # send_and_generate's (Conversation, LLMResult)
        result = result[1]
    return ("ok", getattr(result, "text", None))


def _notes(client: Client) -> list[tuple]:
    notes = []
    while (note := client.next_notification(timeout_ms=0 if notes else 2_000)) is not None:
        if isinstance(note, GenerationResult):
            notes.append(("result", note.result.text) if note.result else ("error", note.error.category))
        elif isinstance(note, CanceledNote):
            notes.append(("canceled", note.reason))
    return notes


def _telemetry(client: Client) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for c in client.telemetry():  # summed over modes and backends: a shared daemon has run others
        counts[c.event, c.outcome, c.category] += c.count
    return counts


class Cell:
    """One scenario on one executor: a client, a fresh conversation, the telemetry before."""

    def __init__(self, connect: Callable[[], Client]) -> None:
        self.client = connect()
        self.conv = f"parity-{next(_ids)}"
        self._before = _telemetry(self.client)

    def signature(self, outcome: Any, **extra: Any) -> dict[str, Any]:
        state = self.client.derived_state(self.conv)
        delta = _telemetry(self.client) - self._before
        signature = {
            "outcome": outcome,
            "history": [(m.role, m.content) for m in state.messages],
            "status": state.status,
            "notes": _notes(self.client),
            "telemetry": dict(sorted(delta.items())),
            **extra,
        }
        self.client.close()
        return signature


STARTED = ("run_started", "", "")
COMPLETED = ("run_finished", "completed", "none")


def _canceled(n: int = 1) -> dict:
    return {STARTED: n, ("run_finished", "canceled", "canceled"): n}


# ---- rows -----------------------------------------------------------------------------


def success_with_message_ordering(cell: Cell):
    conversation, result = cell.client.send_and_generate(cell.conv, "first", generation_opts={"backend_opts": {"reply": "one"}})
    cell.client.send_and_generate(cell.conv, "second", generation_opts={"backend_opts": {"reply": "two"}})
    seqs = [m.seq for m in cell.client.derived_state(cell.conv).messages]
    return cell.signature(("ok", result.text), tuple_holds_reply=conversation.state.messages[-1].content == "one", ordered=seqs == sorted(seqs))


def provider_error(cell: Cell):
    opts = {"backend_opts": {"error": {"category": "provider", "message": "overloaded"}}}
    outcome = _outcome(lambda: cell.client.send_and_generate(cell.conv, "hi", generation_opts=opts))
    ref = cell.client.generate_assistant_reply(cell.conv, backend_opts={"reply": "r"})  # the guard is down again
    return cell.signature(outcome, after=_outcome(lambda: cell.client.await_generation(cell.conv, ref)))


def unknown_error(cell: Cell):
    opts = {"backend_opts": {"error": {"category": "unknown", "message": "???"}}}
    return cell.signature(_outcome(lambda: cell.client.send_and_generate(cell.conv, "hi", generation_opts=opts)))


def timeout_with_cancel(cell: Cell):
    cell.client.send_user_message(cell.conv, "slow")
    ref = cell.client.generate_assistant_reply(cell.conv, **SLOW)
    first = _outcome(lambda: cell.client.await_generation(cell.conv, ref, timeout_ms=50))
    again = _outcome(lambda: cell.client.await_generation(cell.conv, ref, timeout_ms=0))
    return cell.signature((first, again))


def timeout_without_cancel(cell: Cell):
    cell.client.send_user_message(cell.conv, "steady")
    ref = cell.client.generate_assistant_reply(cell.conv, backend_opts={"delay_ms": 300, "reply": "done"})
    first = _outcome(lambda: cell.client.await_generation(cell.conv, ref, timeout_ms=5, cancel_on_timeout=False))
    guard = _outcome(lambda: cell.client.generate_assistant_reply(cell.conv))
    again = _outcome(lambda: cell.client.await_generation(cell.conv, ref, timeout_ms=10_000))
    return cell.signature((first, guard, again))


def guard_recovery_after_error_and_cancel(cell: Cell):
    opts = {"backend_opts": {"error": {"category": "transport", "message": "reset"}}}
    _outcome(lambda: cell.client.send_and_generate(cell.conv, "a", generation_opts=opts))
    ref = cell.client.generate_assistant_reply(cell.conv, **SLOW)
    cell.client.cancel_generation(cell.conv)
    _outcome(lambda: cell.client.await_generation(cell.conv, ref))
    return cell.signature(_outcome(lambda: cell.client.send_and_generate(cell.conv, "b")))


def cancel_reason_propagation(cell: Cell):
    cell.client.send_user_message(cell.conv, "hi")
    ref = cell.client.generate_assistant_reply(cell.conv, **SLOW)
    cell.client.cancel_generation(cell.conv, reason="user_left")
    state = cell.client.derived_state(cell.conv)
    journaled = [e.data.get("reason") for e in cell.client.conversation_thread_entries(cell.conv) if e.event == "cancel_requested"]
    outcome = _outcome(lambda: cell.client.await_generation(cell.conv, ref))
    return cell.signature(outcome, state_reason=(state.cancel_requested, state.cancel_reason), journaled=journaled)


def concurrency_guard(cell: Cell):
    cell.client.send_user_message(cell.conv, "hi")
    ref = cell.client.generate_assistant_reply(cell.conv, **SLOW)
    second = _outcome(lambda: cell.client.generate_assistant_reply(cell.conv))
    send = _outcome(lambda: cell.client.send_user_message(cell.conv, "not recorded"))
    sag = _outcome(lambda: cell.client.send_and_generate(cell.conv, "not recorded either"))
    cell.client.cancel_generation(cell.conv)
    _outcome(lambda: cell.client.await_generation(cell.conv, ref))
    return cell.signature((second, send, sag))


def send_and_generate_error_mapping(cell: Cell):
    opts = {"backend_opts": {"error": {"category": "auth", "message": "bad key"}}}
    return cell.signature(_outcome(lambda: cell.client.send_and_generate(cell.conv, "hi", generation_opts=opts)))


def cancel_racing_completion(cell: Cell):
    outcomes = set()
    for i in range(5):
        cell.client.send_user_message(cell.conv, f"race {i}") if i == 0 else None
        ref = cell.client.generate_assistant_reply(cell.conv, backend_opts={"reply": "won"})
        try:
            cell.client.cancel_generation(cell.conv, reason="raced")
        except GenvisorError:
            pass  # it finished first: nothing to cancel
        outcomes.add(_outcome(lambda ref=ref: cell.client.await_generation(cell.conv, ref))[0])
    entries = cell.client.conversation_thread_entries(cell.conv)
    finished = [e for e in entries if e.event == "run_finished"]
    notes = _notes(cell.client)
    delta = _telemetry(cell.client) - cell._before
    cell.client.close()
    # Which side wins each race may differ; that each run ends exactly once may not.
    return {
        "outcomes_are_known": outcomes <= {"ok", "GenerationCanceled"},
        "one_run_finished_each": len(finished) == 5 and len({e.data["run_id"] for e in finished}) == 5,
        "one_terminal_note_each": len(notes) == 5,
        "telemetry_balanced": delta[STARTED] == 5 and sum(n for k, n in delta.items() if k[0] == "run_finished") == 5,
        "no_reply_after_cancel": all(
            not (e.role == "assistant" and any(f.data.get("status") == "canceled" and f.data["run_id"] == e.data.get("run_id") for f in finished))
            for e in entries
        ),
    }


def worker_crash(cell: Cell):
    outcome = _outcome(lambda: cell.client.send_and_generate(cell.conv, "hi", generation_opts={"backend_opts": {"crash": "exit"}}))
    return cell.signature(outcome)


def deadline(cell: Cell):
    outcome = _outcome(lambda: cell.client.send_and_generate(cell.conv, "hi", generation_opts={"timeout_ms": 50, **SLOW}))
    return cell.signature(outcome)


ROWS: dict[Callable, dict[str, Any]] = {
    success_with_message_ordering: {
        "outcome": ("ok", "one"),
        "history": [("user", "first"), ("assistant", "one"), ("user", "second"), ("assistant", "two")],
        "status": "responding",
        "notes": [("result", "one"), ("result", "two")],
        "telemetry": {STARTED: 2, COMPLETED: 2},
        "tuple_holds_reply": True,
        "ordered": True,
    },
    provider_error: {
        "outcome": ("LLMError", "provider", "overloaded"),
        "notes": [("error", "provider"), ("result", "r")],
        "history": [("user", "hi"), ("assistant", "r")],
        "status": "responding",
        "telemetry": {STARTED: 2, COMPLETED: 1, ("run_finished", "failed", "provider"): 1},
        "after": ("ok", "r"),
    },
    unknown_error: {
        "outcome": ("LLMError", "unknown", "???"),
        "history": [("user", "hi")],
        "status": "pending_llm",
        "notes": [("error", "unknown")],
        "telemetry": {STARTED: 1, ("run_finished", "failed", "unknown"): 1},
    },
    timeout_with_cancel: {
        "outcome": (("AwaitTimeout",), ("GenerationCanceled", "await_timeout")),
        "history": [("user", "slow")],
        "status": "canceled",
        "notes": [("canceled", "await_timeout")],
        "telemetry": _canceled(),
    },
    timeout_without_cancel: {
        "outcome": (("AwaitTimeout",), ("GenerationInProgress",), ("ok", "done")),
        "history": [("user", "steady"), ("assistant", "done")],
        "status": "responding",
        "notes": [("result", "done")],
        "telemetry": {STARTED: 1, COMPLETED: 1},
    },
    guard_recovery_after_error_and_cancel: {
        "outcome": ("ok", "b"),
        "history": [("user", "a"), ("user", "b"), ("assistant", "b")],
        "status": "responding",
        "notes": [("error", "transport"), ("canceled", "cancel_requested"), ("result", "b")],
        "telemetry": {STARTED: 3, COMPLETED: 1, ("run_finished", "failed", "transport"): 1, ("run_finished", "canceled", "canceled"): 1},
    },
    cancel_reason_propagation: {
        "outcome": ("GenerationCanceled", "user_left"),
        "history": [("user", "hi")],
        "status": "canceled",
        "notes": [("canceled", "user_left")],
        "telemetry": _canceled(),
        "state_reason": (True, "user_left"),
        "journaled": ["user_left"],
    },
    concurrency_guard: {
        "outcome": (("GenerationInProgress",), ("GenerationInProgress",), ("GenerationInProgress",)),
        "history": [("user", "hi")],
        "status": "canceled",
        "notes": [("canceled", "cancel_requested")],
        "telemetry": _canceled(),
    },
    send_and_generate_error_mapping: {
        "outcome": ("LLMError", "auth", "bad key"),
        "history": [("user", "hi")],
        "status": "pending_llm",
        "notes": [("error", "auth")],
        "telemetry": {STARTED: 1, ("run_finished", "failed", "auth"): 1},
    },
    cancel_racing_completion: {
        "outcomes_are_known": True,
        "one_run_finished_each": True,
        "one_terminal_note_each": True,
        "telemetry_balanced": True,
        "no_reply_after_cancel": True,
    },
    worker_crash: {
        "outcome": ("LLMError", "unknown", "generation worker crashed"),
        "history": [("user", "hi")],
        "status": "pending_llm",
        "notes": [("error", "unknown")],
        "telemetry": {STARTED: 1, ("run_finished", "failed", "unknown"): 1},
    },
    deadline: {
        "outcome": ("LLMError", "timeout", "generation deadline passed (50 ms + 200 ms grace)"),
        "history": [("user", "hi")],
        "status": "pending_llm",
        "notes": [("error", "timeout")],
        "telemetry": {STARTED: 1, ("run_finished", "failed", "timeout"): 1},
    },
}


# ---- rows: a second generation on a busy conversation (`multitask`) -----------------------


def enqueue_order(cell: Cell):
    cell.client.send_user_message(cell.conv, "first")
    refs = [cell.client.generate_assistant_reply(cell.conv, backend_opts={"delay_ms": 200, "reply": "one"})]
    refs += [cell.client.generate_assistant_reply(cell.conv, multitask="enqueue", backend_opts={"reply": reply}) for reply in ("two", "three")]
    last = _outcome(lambda: cell.client.await_generation(cell.conv, refs[-1]))  # the last queued: the others have ended by then
    runs = cell.client.derived_state(cell.conv).run_history[::-1]
    in_turn = all(later.started_at >= (earlier.finished_at or 0) for earlier, later in itertools.pairwise(runs))
    return cell.signature(last, in_turn=in_turn, earlier=[_outcome(lambda r=r: cell.client.await_generation(cell.conv, r)) for r in refs[:2]])


def interrupt(cell: Cell):
    cell.client.send_user_message(cell.conv, "long")
    ref = cell.client.generate_assistant_reply(cell.conv, **SLOW)
    outcome = _outcome(lambda: cell.client.send_and_generate(
        cell.conv, "instead", generation_opts={"multitask": "interrupt", "backend_opts": {"reply": "new"}}))
    return cell.signature(outcome, interrupted=_outcome(lambda: cell.client.await_generation(cell.conv, ref)))


ROWS[enqueue_order] = {
    "outcome": ("ok", "three"),
    "history": [("user", "first"), ("assistant", "one"), ("assistant", "two"), ("assistant", "three")],
    "status": "responding",
    "notes": [("result", "one"), ("result", "two"), ("result", "three")],
    "telemetry": {STARTED: 3, COMPLETED: 3},
    "in_turn": True,
    "earlier": [("ok", "one"), ("ok", "two")],
}
ROWS[interrupt] = {
    "outcome": ("ok", "new"),
    "history": [("user", "long"), ("user", "instead"), ("assistant", "new")],
    "status": "responding",
    "notes": [("canceled", "interrupted"), ("result", "new")],
    "telemetry": {STARTED: 2, COMPLETED: 1, ("run_finished", "canceled", "canceled"): 1},
    "interrupted": ("GenerationCanceled", "interrupted"),
}


# ---- rows: tool approvals -------------------------------------------------------------------

ASKING = [{"tool_calls": [{"name": "run_command", "arguments": {"argv": ["sh", "-c", "echo ran > made.txt"]}}]}, {"text": "after"}]


def _approval_row(answer: Callable[[Client, str, str, str], None]) -> Callable[[Cell], dict[str, Any]]:
    def row(cell: Cell) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as scratch:
            client, conv = cell.client, cell.conv
            client.start_conversation(conv, metadata={"workspace": scratch})
            client.configure_skills(conv, ["run_command"])
            client.configure_mode(conv, "coding", {"approvals": {"run_command": "ask"}})
            client.send_user_message(conv, "run it")
            ref = client.generate_assistant_reply(conv, backend_opts={"script": ASKING})
            asked = client.next_notification(timeout_ms=10_000)
            status = client.derived_state(conv).active_run.status
            answer(client, conv, ref, asked.tool_call.id)
            outcome = _outcome(lambda: client.await_generation(conv, ref))
            ran = (Path(scratch) / "made.txt").exists()
            return cell.signature(outcome, asked=(asked.kind, asked.tool_call.name), paused=status, ran=ran)
    return row


def approved(cell: Cell):
    return _approval_row(lambda client, conv, ref, call_id: client.resolve_approval(conv, ref, call_id, approve=True))(cell)


def denied(cell: Cell):
    return _approval_row(lambda client, conv, ref, call_id: client.resolve_approval(conv, ref, call_id, approve=False))(cell)


def canceled_while_paused(cell: Cell):
    return _approval_row(lambda client, conv, ref, call_id: client.cancel_generation(conv, "no"))(cell)


_ASKED = {"asked": ("approval_requested", "run_command"), "paused": "awaiting_approval"}
_RAN = "exit code 0\n--- stdout ---\n\n--- stderr ---\n"
ROWS[approved] = {
    "outcome": ("ok", "after"), "history": [("user", "run it"), ("assistant", ""), ("tool", _RAN), ("assistant", "after")],
    "status": "responding", "notes": [("result", "after")], "telemetry": {STARTED: 1, COMPLETED: 1}, "ran": True, **_ASKED,
}
ROWS[denied] = {
    **ROWS[approved], "ran": False,
    "history": [("user", "run it"), ("assistant", ""), ("tool", "the user denied this run_command call"), ("assistant", "after")],
}
ROWS[canceled_while_paused] = {
    "outcome": ("GenerationCanceled", "no"), "history": [("user", "run it")], "status": "canceled",
    "notes": [("canceled", "no")], "telemetry": _canceled(), "ran": False, **_ASKED,
}


# ---- rows: a run that does not complete changes no file ----------------------------------

EFFECTS = {
    "file_tools": [{"tool_calls": [{"name": "write_file", "arguments": {"path": "keep.txt", "content": "CHANGED\n"}},
                                   {"name": "write_file", "arguments": {"path": "new/dir/f.txt", "content": "new\n"}}]}],
    "run_command": [{"tool_calls": [{"name": "run_command", "arguments": {
        "argv": ["sh", "-c", "echo CHANGED > keep.txt; rm gone.txt; mkdir -p new/dir; echo x > new/dir/f.txt"]}}]}],
}
HANG = {"delay_ms": 60_000}


def _changed(workspace: Path) -> bool:
    return (workspace / "keep.txt").read_text() == "CHANGED\n"


def _workspace_as_it_was(workspace: Path) -> bool:
    return sorted(p.name for p in workspace.iterdir()) == ["gone.txt", "keep.txt"] and not _changed(workspace)


def _wait_for(condition: Callable[[], bool], timeout_s: float = 20) -> None:
    wait_until(condition, timeout_s, "the run's change to the workspace")


def _cancel_after_effect(how: Callable[[Client, str, str], Any]) -> Callable[[Client, str, str, Path], Any]:
    def run(client: Client, conv: str, ref: str, workspace: Path) -> Any:
        _wait_for(lambda: _changed(workspace))
        return how(client, conv, ref)
    return run


# kind → (the step after the effect, options, mode_state, how the run is ended, expected outcome, expected end note)
NON_COMPLETIONS: dict[str, tuple] = {
    "backend_error": ({"error": {"category": "provider", "message": "down"}}, {}, {}, None,
                      ("LLMError", "provider", "down"), ("failed", "provider")),
    "step_budget": ({"tool_calls": [{"name": "write_file", "arguments": {"path": "never.txt", "content": "x"}}]}, {},
                    {"max_steps": 2}, None, ("LLMError", "unknown", "step budget of 2 LLM calls exhausted"), ("failed", "unknown")),
    "worker_crash": ({"crash": "exit"}, {}, {}, None, ("LLMError", "unknown", "generation worker crashed"), ("failed", "unknown")),
    "deadline": (HANG, {"timeout_ms": 1_000}, {}, None,
                 ("LLMError", "timeout", "generation deadline passed (1000 ms + 200 ms grace)"), ("failed", "timeout")),
    "cancel": (HANG, {}, {}, _cancel_after_effect(lambda c, conv, ref: c.cancel_generation(conv, "changed_mind")),
               ("GenerationCanceled", "changed_mind"), ("canceled", "changed_mind")),
    "await_timeout": (HANG, {}, {}, _cancel_after_effect(lambda c, conv, ref: _outcome(lambda: c.await_generation(conv, ref, timeout_ms=1))),
                      ("GenerationCanceled", "await_timeout"), ("canceled", "await_timeout")),
    "conversation_stopped": (HANG, {}, {}, _cancel_after_effect(lambda c, conv, ref: c.stop_conversation(conv)),
                             ("GenerationCanceled", "conversation_stopped"), ("canceled", "conversation_stopped")),
    "forced_mode_switch": (HANG, {}, {}, _cancel_after_effect(
        lambda c, conv, ref: c.configure_mode(conv, "coding", {}, force=True, cancel_reason="switching")),
        ("GenerationCanceled", "switching"), ("canceled", "switching")),
}


def _undone_row(kind: str, effect: str) -> Callable[[Cell], dict[str, Any]]:
    then, options, mode_state, end, _, _ = NON_COMPLETIONS[kind]

    def row(cell: Cell) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as scratch:
            workspace = Path(scratch)
            (workspace / "keep.txt").write_text("ORIGINAL\n")
            (workspace / "gone.txt").write_text("to be deleted\n")
            client, conv = cell.client, cell.conv
            client.start_conversation(conv, metadata={"workspace": str(workspace)})
            client.configure_skills(conv, ["write_file", "run_command"])
            if mode_state:
                client.configure_mode(conv, "coding", mode_state)
            client.send_user_message(conv, "change, then do not complete")
            ref = client.generate_assistant_reply(conv, backend_opts={"script": [*EFFECTS[effect], then]}, **options)
            if end is not None:
                end(client, conv, ref, workspace)
            outcome = _outcome(lambda: client.await_generation(conv, ref))
            try:
                client.await_generation(conv, ref)
                details = None
            except LLMError as exc:
                details = exc.details.get("workspace")
            except GenerationCanceled:
                details = "(a cancel settles at once)"
            settled = client.turn_changes(conv, ref).workspace  # waits for the restore
            return cell.signature(outcome, workspace=settled, details=details, as_it_was=_workspace_as_it_was(workspace))

    row.__name__ = f"{kind}_after_{effect}_is_undone"
    return row


for _kind, (_, _, _, _, _outcome_expected, (_status, _category)) in NON_COMPLETIONS.items():
    for _effect in EFFECTS:
        canceled = _status == "canceled"
        ROWS[_undone_row(_kind, _effect)] = {
            "outcome": _outcome_expected,
            "history": [("user", "change, then do not complete")],
            "status": "canceled" if canceled else "pending_llm",
            "notes": [("canceled", _category)] if canceled else [("error", _category)],
            "telemetry": _canceled() if canceled else {STARTED: 1, ("run_finished", "failed", _category): 1},
            "workspace": "restored",
            "details": "(a cancel settles at once)" if canceled else "restored",
            "as_it_was": True,
        }


# In-process there is no worker to crash: the host stands a crash in with SystemExit,
# which the executor reports as a worker's exit would be. Those cells are not parity
# with a crash, so they are not counted as such: the worker_process column checks the
# real thing, and the test below checks the stand-in, under its own name.
CRASH_ROWS = [row for row in ROWS if "crash" in row.__name__]


@pytest.mark.parametrize("scenario", list(ROWS), ids=lambda s: s.__name__)
def test_parity(connect, scenario, request):
    if scenario in CRASH_ROWS and request.node.callspec.params["connect"] == "in_process":
        pytest.skip("no worker to crash in-process: see test_in_process_a_crash_is_stood_in_for_as_a_worker_exit_would_be")
    assert scenario(Cell(connect)) == ROWS[scenario]


@pytest.mark.parametrize("scenario", CRASH_ROWS, ids=lambda s: s.__name__)
def test_in_process_a_crash_is_stood_in_for_as_a_worker_exit_would_be(connect, scenario, request):
    if request.node.callspec.params["connect"] != "in_process":
        pytest.skip("the worker_process column of test_parity crashes a real worker")
    assert scenario(Cell(connect)) == ROWS[scenario]


def test_shutdown_ends_every_run_exactly_once_in_telemetry(tmp_path):
    from genvisor.daemon.config import Config
    from genvisor.daemon.embedded import EmbeddedDaemon

    with EmbeddedDaemon(Config(state_dir=str(tmp_path))) as runtime, Client(transport=runtime.connect) as client:
        for n in range(3):
            client.send_user_message(f"s{n}", "hi")
            client.generate_assistant_reply(f"s{n}", **SLOW)
        client.send_and_generate("done", "hi")
    counts = {(c.event, c.outcome, c.category): c.count for c in runtime.service.telemetry.snapshot()}
    assert counts == {STARTED: 4, COMPLETED: 1, ("run_finished", "canceled", "canceled"): 3}


def test_tools_run_in_process_too(tmp_path):
    from genvisor.daemon.config import Config
    from genvisor.daemon.embedded import EmbeddedDaemon

    script = [
        {"tool_calls": [{"name": "run_command", "arguments": {"argv": ["sh", "-c", "echo from-the-command > made.txt; echo done"]}}]},
        {"text": "ok"},
    ]
    with EmbeddedDaemon(Config(state_dir=str(tmp_path))) as runtime, Client(transport=runtime.connect) as client:
        client.start_conversation("t", metadata={"workspace": str(tmp_path / "ws")})
        client.configure_skills("t", ["run_command"])
        client.configure_mode("t", "coding", {"approvals": {"run_command": "allow"}})  # the default asks
        _, result = client.send_and_generate("t", "go", generation_opts={"backend_opts": {"script": script}})
        tool_result = [m for m in client.conversation_messages("t") if m.role == "tool"][0]
    assert result.text == "ok" and "exit code 0" in tool_result.content and "done" in tool_result.content
    assert (tmp_path / "ws" / "made.txt").read_text() == "from-the-command\n"
