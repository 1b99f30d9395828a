"""Properties of the conversation fold (`genvisor.modes.conversation`).

Random valid journals are built with Hypothesis and checked against the contract's
rules: replay is prefix-consistent and resumable, and the derived state agrees with
a small independent model of those rules (turn, status, sticky cancel, llm merge,
skills, runs). Plain examples below pin the llm merge and sticky cancel rules.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import msgspec
from hypothesis import given, settings, strategies as st

from genvisor.modes.conversation import RUN_HISTORY_LIMIT, JournalEntry, apply, fold, initial_state
from genvisor.modes.tools import DEFAULT_SKILLS
from genvisor.types import TERMINAL_RUN_STATUSES, DerivedState, LLMConfig

ROLES = ("user", "assistant", "system", "tool")
TERMINAL = sorted(TERMINAL_RUN_STATUSES)
MISSING = object()  # a key left out of a note's data

# ---- strategies ------------------------------------------------------------------------

# Few keys, so options of successive llm_configured notes collide and really merge.
_leaf = st.one_of(st.integers(-2, 2), st.booleans(), st.sampled_from(["x", "y"]), st.none())
_option_value = st.recursive(
    _leaf, lambda children: st.dictionaries(st.sampled_from(["p", "q", "r"]), children, max_size=3), max_leaves=6
)
_options = st.dictionaries(st.sampled_from(["temperature", "tools", "nested", "extra"]), _option_value, max_size=3)
_llm_field = st.one_of(st.just(MISSING), st.none(), st.sampled_from(["alpha", "beta", ""]))
_reason = st.sampled_from(["user_changed_mind", "cancel_requested", "timeout", "daemon_shutdown", "r"])

# One journal step: (seq gap, time step, action). Actions are materialized in order by
# `_materialize`, which allocates run ids and decides start vs. finish of a run.
_message = st.tuples(
    st.just("message"),
    st.sampled_from(ROLES),
    st.sampled_from(["", "hi", "fix the bug", "  ", "ünïcödé", "a\nb"]),
    st.sampled_from([{}, {"run_id": "run_1"}, {"k": 1}]),
)
_cancel = st.tuples(st.just("cancel"), _reason)
_llm = st.tuples(st.just("llm"), _llm_field, _llm_field, _llm_field, st.one_of(st.just(MISSING), st.none(), _options))
_skills = st.tuples(st.just("skills"), st.lists(st.sampled_from(["git", "shell", "search", "edit"]), max_size=4))
# On "run": start a run if none is active (mode, unused status/reason), else finish the active one.
_run = st.tuples(
    st.just("run"), st.sampled_from([MISSING, "coding", "review"]), st.sampled_from(TERMINAL), st.one_of(st.none(), _reason)
)
# Whole runs: 1-4 times run_started then run_finished, so histories fill up.
_run_pairs = st.tuples(
    st.just("run_pairs"),
    st.sampled_from([MISSING, "coding", "review"]),
    st.sampled_from(TERMINAL),
    st.one_of(st.none(), _reason),
    st.integers(1, 4),
)
# A run_finished for a run that is not active: a finished run (picked by index) or an unknown one.
_stray = st.tuples(st.just("stray"), st.integers(0, 1000), st.sampled_from(TERMINAL), _reason)


def _steps(*actions: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(st.integers(1, 3), st.sampled_from([0.0, 0.25, 1.0, 3.5]), st.one_of(*actions))


_MIXED = _steps(_message, _cancel, _llm, _skills, _run, _stray)
_RUN_HEAVY = _steps(_run_pairs, _run, _stray, _message, _cancel)


def _materialize(start: tuple[int, int, list[tuple[int, float, tuple]]]) -> list[JournalEntry]:
    """A valid journal: increasing seq, non-decreasing `at`, unique run ids, at most one
    active run, run_finished with a terminal status, plus stray run_finished notes (for
    unknown ids and for runs that already finished)."""
    seq, at, steps = start[0], float(start[1]), start[2]
    active: str | None = None
    finished: list[str] = []
    entries: list[JournalEntry] = []

    def emit(kind: str, **fields: Any) -> None:
        nonlocal seq
        seq += 1
        entries.append(JournalEntry(entry_id=f"e{seq}", seq=seq, kind=kind, at=at, **fields))  # type: ignore[arg-type]

    def start_run(mode: Any) -> None:
        nonlocal active
        active = f"run_{len(finished) + 1}"
        emit("note", event="run_started", data={"run_id": active} if mode is MISSING else {"run_id": active, "mode": mode})

    def finish_run(status: str, reason: str | None) -> None:
        nonlocal active
        assert active is not None
        data = {"run_id": active, "status": status} if reason is None else {"run_id": active, "status": status, "reason": reason}
        emit("note", event="run_finished", data=data)
        finished.append(active)
        active = None

    for gap, dt, action in steps:
        seq, at = seq + gap - 1, at + dt  # emit() adds the last 1 of the gap
        if action[0] == "message":
            _, role, content, metadata = action
            emit("message", role=role, content=content, data=metadata)
        elif action[0] == "cancel":
            emit("note", event="cancel_requested", data={"reason": action[1]})
        elif action[0] == "llm":
            keys = ("backend", "provider", "model", "options")
            emit("note", event="llm_configured", data={k: v for k, v in zip(keys, action[1:], strict=True) if v is not MISSING})
        elif action[0] == "skills":
            emit("note", event="skills_configured", data={"skills": action[1]})
        elif action[0] == "run":
            _, mode, status, reason = action
            if active is None:
                start_run(mode)
            else:
                finish_run(status, reason)
        elif action[0] == "run_pairs":
            _, mode, status, reason, count = action
            if active is not None:
                finish_run(status, reason)
            for _ in range(count):
                start_run(mode)
                at += dt
                finish_run(status, reason)
        else:
            _, pick, status, reason = action
            stray = finished[pick % len(finished)] if finished and pick % 4 else "run_ghost"
            emit("note", event="run_finished", data={"run_id": stray, "status": status, "reason": reason})
    return entries


def journals(steps: st.SearchStrategy = _MIXED, min_size: int = 8, max_size: int = 30) -> st.SearchStrategy:
    return st.tuples(
        st.integers(0, 3), st.integers(0, 1000), st.lists(steps, min_size=min_size, max_size=max_size)
    ).map(_materialize)


# ---- an independent model of the contract's rules ---------------------------------------


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def expected(entries: list[JournalEntry]) -> dict[str, Any]:
    """What the rules say the state is after `entries` (only the fields the rules fix)."""
    m: dict[str, Any] = dict(
        status="idle", turn=0, cancel_requested=False, cancel_reason=None, last_user_message=None,
        backend=None, provider=None, model=None, options={}, skills=list(DEFAULT_SKILLS), active=None, history=[],
    )
    for e in entries:
        if e.kind == "message":
            if e.role == "user":
                m.update(status="pending_llm", turn=m["turn"] + 1, last_user_message=e.content)
            elif e.role == "assistant":
                m["status"] = "responding"
        elif e.event == "cancel_requested":
            m.update(status="canceled", cancel_requested=True, cancel_reason=e.data["reason"])
        elif e.event == "llm_configured":
            for key in ("backend", "provider", "model"):
                if e.data.get(key) is not None:
                    m[key] = e.data[key]
            m["options"] = _merge(m["options"], e.data.get("options") or {})
        elif e.event == "skills_configured":
            m["skills"] = list(e.data["skills"])
        elif e.event == "run_started":
            m["active"] = (e.data["run_id"], e.data.get("mode", "coding"), e.at)
        elif e.event == "run_finished" and m["active"] is not None and m["active"][0] == e.data["run_id"]:
            run_id, mode, started_at = m["active"]
            done = (run_id, mode, e.data["status"], started_at, e.at, e.data.get("reason"))
            m.update(active=None, history=[done, *m["history"]][:RUN_HISTORY_LIMIT])
    return m


def observed(state: DerivedState) -> dict[str, Any]:
    active = state.active_run
    return dict(
        status=state.status, turn=state.turn, cancel_requested=state.cancel_requested, cancel_reason=state.cancel_reason,
        last_user_message=state.last_user_message, backend=state.llm.backend, provider=state.llm.provider,
        model=state.llm.model, options=state.llm.options, skills=state.skills,
        active=None if active is None else (active.run_id, active.mode, active.started_at),
        history=[(r.run_id, r.mode, r.status, r.started_at, r.finished_at, r.reason) for r in state.run_history],
    )


def states_by_apply(entries: list[JournalEntry]) -> list[DerivedState]:
    """states[k] is the state after applying entries[:k] one at a time."""
    states = [initial_state()]
    for entry in entries:
        states.append(apply(states[-1], entry))
    return states


PROPERTY = settings(max_examples=100, deadline=None)

# ---- properties -------------------------------------------------------------------------


@PROPERTY
@given(journals())
def test_folding_any_prefix_equals_applying_its_entries_one_by_one(entries):
    frozen_journal = msgspec.json.encode(entries)
    states = states_by_apply(entries)
    for k in range(len(entries) + 1):
        assert fold(entries[:k]) == states[k]
        assert fold(entries[:k], initial_state()) == states[k]
    # Applying later entries neither altered earlier states nor the journal itself.
    assert [fold(entries[:k]) for k in range(len(entries) + 1)] == states
    assert msgspec.json.encode(entries) == frozen_journal


@PROPERTY
@given(journals(), st.data())
def test_folding_is_resumable_from_any_split_point(entries, data):
    k = data.draw(st.integers(0, len(entries)), label="split")
    a, b = entries[:k], entries[k:]
    assert fold(a + b) == fold(b, fold(a))
    assert fold(b, fold(a)) == fold(entries)


@PROPERTY
@given(journals())
def test_every_prefix_state_agrees_with_the_contract_model(entries):
    for k, state in enumerate(states_by_apply(entries)):
        assert observed(state) == expected(entries[:k])


@PROPERTY
@given(journals())
def test_turn_and_messages_count_the_message_entries_in_seq_order(entries):
    for k, state in enumerate(states_by_apply(entries)):
        prefix = entries[:k]
        message_entries = [e for e in prefix if e.kind == "message"]
        assert state.turn == sum(1 for e in message_entries if e.role == "user")
        assert len(state.messages) == len(message_entries)
        assert all(a.seq < b.seq for a, b in itertools.pairwise(state.messages))
        assert [(m.entry_id, m.seq, m.role, m.content, m.metadata) for m in state.messages] == [
            (e.entry_id, e.seq, e.role, e.content or "", e.data) for e in message_entries
        ]


@PROPERTY
@given(journals())
def test_cancel_requested_once_true_stays_true(entries):
    states = states_by_apply(entries)
    for before, after in itertools.pairwise(states):
        if before.cancel_requested:
            assert after.cancel_requested
            assert after.cancel_reason is not None


@PROPERTY
@given(journals(_RUN_HEAVY, min_size=15, max_size=35))
def test_run_history_is_bounded_newest_first_and_terminal(entries):
    for state in states_by_apply(entries):
        history = state.run_history
        assert len(history) <= RUN_HISTORY_LIMIT
        finished_at = [r.finished_at for r in history]
        assert None not in finished_at
        assert finished_at == sorted(finished_at, reverse=True)
        assert all(r.status in TERMINAL_RUN_STATUSES for r in history)
        assert all(r.step is None for r in history)
        assert len({r.run_id for r in history}) == len(history)
        if state.active_run is not None:
            assert state.active_run.status == "running"
            assert state.active_run.run_id not in {r.run_id for r in history}


@PROPERTY
@given(journals(_RUN_HEAVY, min_size=15, max_size=35))
def test_a_finished_run_never_changes_afterwards(entries):
    first_seen: dict[str, Any] = {}
    for state in states_by_apply(entries):
        for run in state.run_history:
            assert first_seen.setdefault(run.run_id, run) == run
        if state.active_run is not None:
            assert state.active_run.run_id not in first_seen  # a finished run is never running again


@PROPERTY
@given(journals(), st.data())
def test_a_run_finished_for_a_run_that_is_not_active_changes_nothing(entries, data):
    state = fold(entries)
    active = state.active_run.run_id if state.active_run else None
    known = sorted({e.data["run_id"] for e in entries if e.event == "run_started"} - {active})
    run_id = data.draw(st.sampled_from([*known, "run_never_started"]), label="run_id")
    stray = JournalEntry(
        entry_id="stray", seq=(entries[-1].seq if entries else 0) + 1, kind="note", at=1e9, event="run_finished",
        data={"run_id": run_id, "status": data.draw(st.sampled_from(TERMINAL), label="status"), "reason": "late"},
    )
    assert apply(state, stray) == state


# ---- examples: a new conversation, status transitions, sticky cancel ---------------------


def _entry(seq: int, kind: str = "message", **fields: Any) -> JournalEntry:
    return JournalEntry(entry_id=f"e{seq}", seq=seq, kind=kind, at=float(seq), **fields)  # type: ignore[arg-type]


def _note(seq: int, event: str, **data: Any) -> JournalEntry:
    return _entry(seq, "note", event=event, data=data)


def test_a_new_conversation_is_idle_at_turn_zero():
    for state in (fold([]), initial_state()):
        assert (state.status, state.turn, state.cancel_requested, state.messages) == ("idle", 0, False, [])
        assert state.skills == DEFAULT_SKILLS and state.mode == "coding"
        assert state.active_run is None and state.run_history == []


def test_user_message_makes_status_pending_llm_and_assistant_message_responding():
    states = states_by_apply([_entry(1, role="user", content="hi"), _entry(2, role="assistant", content="hello")])
    assert [(s.status, s.turn, s.last_user_message) for s in states] == [
        ("idle", 0, None), ("pending_llm", 1, "hi"), ("responding", 1, "hi"),
    ]


def test_cancel_requested_sets_status_canceled_and_records_the_reason():
    state = fold([_entry(1, role="user", content="hi"), _note(2, "cancel_requested", reason="user_changed_mind")])
    assert (state.status, state.cancel_requested, state.cancel_reason) == ("canceled", True, "user_changed_mind")


def test_cancel_reason_stays_after_a_later_user_message():
    state = fold([
        _entry(1, role="user", content="a"),
        _note(2, "cancel_requested", reason="too_slow"),
        _entry(3, role="user", content="b"),
    ])
    assert (state.status, state.turn, state.last_user_message) == ("pending_llm", 2, "b")
    assert (state.cancel_requested, state.cancel_reason) == (True, "too_slow")


def test_cancel_stays_requested_through_assistant_replies_and_config_notes():
    state = fold([
        _note(1, "cancel_requested", reason="r"),
        _entry(2, role="assistant", content="x"),
        _note(3, "llm_configured", model="m"),
        _note(4, "skills_configured", skills=["git"]),
        _entry(5, role="user", content="again"),
    ])
    assert (state.status, state.cancel_requested, state.cancel_reason) == ("pending_llm", True, "r")


# ---- examples: llm_configured merge -----------------------------------------------------


def test_llm_none_backend_provider_model_keep_the_previous_values():
    state = fold([
        _note(1, "llm_configured", backend="openai", provider="azure", model="gpt"),
        _note(2, "llm_configured", backend=None, provider=None, model=None),
    ])
    assert (state.llm.backend, state.llm.provider, state.llm.model) == ("openai", "azure", "gpt")


def test_llm_missing_fields_keep_the_previous_values_and_given_ones_replace_them():
    state = fold([
        _note(1, "llm_configured", backend="openai", provider="azure", model="gpt"),
        _note(2, "llm_configured", model="gpt-2"),
        _note(3, "llm_configured", options={"temperature": 0.1}),
    ])
    assert state.llm == LLMConfig(backend="openai", provider="azure", model="gpt-2", options={"temperature": 0.1})


def test_llm_options_deep_merge_and_accumulate_across_notes():
    state = fold([
        _note(1, "llm_configured", options={"sampling": {"temperature": 0.2, "top_p": 0.9}, "stream": True}),
        _note(2, "llm_configured", options={"sampling": {"temperature": 0.7, "extra": {"a": 1}}}),
        _note(3, "llm_configured", options={"sampling": {"extra": {"b": 2}}, "max_tokens": 100}),
        _note(4, "llm_configured", options=None),
    ])
    assert state.llm.options == {
        "sampling": {"temperature": 0.7, "top_p": 0.9, "extra": {"a": 1, "b": 2}},
        "stream": True,
        "max_tokens": 100,
    }


def test_llm_option_set_to_a_plain_value_replaces_a_nested_one():
    state = fold([
        _note(1, "llm_configured", options={"tools": {"shell": True}}),
        _note(2, "llm_configured", options={"tools": "none"}),
    ])
    assert state.llm.options == {"tools": "none"}


def test_llm_merge_leaves_earlier_states_and_notes_untouched():
    first = _note(1, "llm_configured", options={"sampling": {"temperature": 0.2}})
    second = _note(2, "llm_configured", options={"sampling": {"top_p": 0.5}})
    before = fold([first])
    after = apply(before, second)
    assert after.llm.options == {"sampling": {"temperature": 0.2, "top_p": 0.5}}
    assert before.llm.options == {"sampling": {"temperature": 0.2}}
    assert first.data == {"options": {"sampling": {"temperature": 0.2}}}


def test_llm_empty_string_model_is_a_value_not_a_missing_one():
    # Only None or a missing key keeps the previous value; "" replaces it.
    state = fold([_note(1, "llm_configured", backend="openai", model="gpt"), _note(2, "llm_configured", model="")])
    assert (state.llm.backend, state.llm.model) == ("openai", "")


# ---- examples: skills and runs -----------------------------------------------------------


def test_skills_configured_replaces_the_list():
    state = fold([_note(1, "skills_configured", skills=["git", "shell"]), _note(2, "skills_configured", skills=["search"])])
    assert state.skills == ["search"]


def test_run_finished_moves_the_active_run_to_the_front_of_history():
    states = states_by_apply([
        _note(1, "run_started", run_id="r1", mode="coding"),
        _note(2, "run_finished", run_id="r1", status="completed"),
        _note(3, "run_started", run_id="r2", mode="coding"),
        _note(4, "run_finished", run_id="r2", status="failed", reason="boom"),
    ])
    assert states[1].active_run is not None and states[1].active_run.status == "running"
    final = states[-1]
    assert final.active_run is None
    assert [(r.run_id, r.status, r.reason, r.finished_at) for r in final.run_history] == [
        ("r2", "failed", "boom", 4.0), ("r1", "completed", None, 2.0),
    ]


def test_run_finished_again_for_a_finished_run_does_not_change_its_status():
    entries = [
        _note(1, "run_started", run_id="r1", mode="coding"),
        _note(2, "run_finished", run_id="r1", status="completed"),
    ]
    done = fold(entries)
    assert fold([_note(3, "run_finished", run_id="r1", status="canceled", reason="late")], done) == done
    assert done.run_history[0].status == "completed"


def test_run_history_keeps_only_the_newest_runs():
    entries = []
    for i in range(RUN_HISTORY_LIMIT + 5):
        entries += [_note(2 * i + 1, "run_started", run_id=f"r{i}"), _note(2 * i + 2, "run_finished", run_id=f"r{i}", status="completed")]
    history = fold(entries).run_history
    assert len(history) == RUN_HISTORY_LIMIT
    assert [r.run_id for r in history] == [f"r{i}" for i in reversed(range(5, RUN_HISTORY_LIMIT + 5))]
