"""Fuzzed frames against one real daemon: every bad frame is answered BadRequest (with
its request id when one can be read), the daemon serves on, and nothing changes.

Every generated case is invalid by construction, and checked so before it is sent
(the project's own decoder must refuse it): a case that happened to be a valid
request would change state and prove nothing. Locators in request-shaped cases come
from a few probe ids, which must still name no conversation at the end."""

from __future__ import annotations

import typing

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from genvisor.errors import NotFound
from genvisor.ipc import codec, frames
from raw_peer import RawPeer

V = frames.PROTOCOL_VERSION
PROBES = [[None, "fz-a"], ["fz-p", "fz-b"]]
KNOWN_OPS = {cls.__struct_config__.tag for cls in typing.get_args(frames.AnyRequest)}

# One valid request per kind that has typed fields; cut, extended or broken below.
VALID = {
    "ping": {"op": "ping"},
    "start_conversation": {"op": "start_conversation", "id": "fz-a"},
    "send_user_message": {"op": "send_user_message", "loc": PROBES[0], "content": "hello"},
    "configure_llm": {"op": "configure_llm", "loc": PROBES[1], "model": "m"},
    "configure_skills": {"op": "configure_skills", "loc": PROBES[0], "enabled": ["read_file"]},
    "configure_mode": {"op": "configure_mode", "loc": PROBES[0], "mode": "coding", "force": False},
    "generate_assistant_reply": {"op": "generate_assistant_reply", "loc": PROBES[0], "options": {"backend_opts": {"reply": "x"}}},
    "await_generation": {"op": "await_generation", "loc": PROBES[1], "ref": "gen_x", "timeout_ms": 5, "cancel_on_timeout": False},
    "conversation_messages": {"op": "conversation_messages", "loc": PROBES[0], "max_messages": 3},
    "conversation_llm_context": {"op": "conversation_llm_context", "loc": PROBES[1], "include_system": True},
    "send_and_generate": {"op": "send_and_generate", "loc": PROBES[0], "content": "hi"},
}
REQUIRED = [("start_conversation", "id"), ("send_user_message", "content"), ("send_user_message", "loc"),
            ("configure_mode", "mode"), ("await_generation", "ref"), ("configure_skills", "enabled")]

ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what msgpack can carry
ids = ints
small = st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False), st.text(max_size=8), st.binary(max_size=8))
msgpack_values = st.recursive(
    small, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)), max_leaves=12
)

not_str = st.one_of(ints, st.booleans(), st.binary(max_size=4), st.lists(ints, max_size=2), st.dictionaries(st.text(max_size=3), ints, max_size=2))
not_int = st.one_of(st.text(max_size=5), st.booleans(), st.floats(allow_nan=False), st.binary(max_size=4), st.lists(ints, max_size=2))
not_bool = st.one_of(ints, st.text(max_size=5), st.none(), st.floats(allow_nan=False))
not_list = st.one_of(st.text(max_size=5), ints, st.none(), st.dictionaries(st.text(max_size=3), ints, max_size=2))
not_loc = st.one_of(ints, st.text(max_size=5), st.none(), st.just([None]), st.lists(ints, min_size=2, max_size=2),
                    st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2))
not_options = st.one_of(st.text(max_size=5), ints, st.lists(ints, max_size=2), st.dictionaries(ints, ints, min_size=1, max_size=2))
WRONG_TYPES = [
    ("start_conversation", "id", st.one_of(not_str, st.none())),
    ("send_user_message", "content", st.one_of(not_str, st.none())),
    ("send_user_message", "loc", not_loc),
    ("configure_llm", "model", not_str),
    ("configure_skills", "enabled", not_list),
    ("configure_mode", "force", not_bool),
    ("generate_assistant_reply", "options", not_options),
    ("await_generation", "timeout_ms", not_int),
    ("await_generation", "cancel_on_timeout", not_bool),
    ("conversation_messages", "max_messages", not_int),
    ("conversation_llm_context", "include_system", not_bool),
]


def frame(rid: int, req, v=V, **extra) -> bytes:
    return msgspec.msgpack.encode({"v": v, "id": rid, "req": req, **extra})


def _id_end(rid: int) -> int:
    """How many leading bytes of `frame(rid, …)` hold its id (map header, v, id)."""
    return len(msgspec.msgpack.encode({"v": V, "id": rid}))


def _with(op: str, **fields) -> dict:
    return {**VALID[op], **fields}


ops = st.sampled_from(sorted(VALID))

# Each case: (category, parts, the id the answer must carry, or None when none can be read).


@st.composite
def truncated(draw):
    rid, op = draw(ids), draw(ops)
    whole = frame(rid, VALID[op])
    cut = draw(st.integers(0, len(whole) - 1))
    return "truncated", [whole[:cut]], rid if cut >= _id_end(rid) else 0


@st.composite
def wrong_version(draw):
    rid, op = draw(ids), draw(ops)
    v = draw(st.one_of(ints.filter(lambda v: v != V), st.text(max_size=4), st.none()))
    return "wrong_version", [frame(rid, VALID[op], v=v)], rid


@st.composite
def unknown_op(draw):
    rid = draw(ids)
    op = draw(st.one_of(st.text(max_size=30).filter(lambda op: op not in KNOWN_OPS), ints, st.none()))
    return "unknown_op", [frame(rid, {"op": op})], rid


@st.composite
def wrong_type(draw):
    rid, (op, field, bad_values) = draw(ids), draw(st.sampled_from(WRONG_TYPES))
    return "wrong_type", [frame(rid, _with(op, **{field: draw(bad_values)}))], rid


@st.composite
def missing_field(draw):
    rid, (op, field) = draw(ids), draw(st.sampled_from(REQUIRED))
    return "missing_field", [frame(rid, {k: v for k, v in VALID[op].items() if k != field})], rid


@st.composite
def unknown_field(draw):
    rid, op, name, value = draw(ids), draw(ops), "x_" + draw(st.text(max_size=6)), draw(msgpack_values)
    in_request = draw(st.booleans())
    data = frame(rid, _with(op, **{name: value})) if in_request else frame(rid, VALID[op], **{name: value})
    return "unknown_field", [data], rid


@st.composite
def huge_string(draw):
    """A big string (1–8 MiB, under the limit) where it makes the request invalid."""
    rid, text = draw(ids), "x" * draw(st.integers(1 << 20, 8 << 20))
    req = draw(st.sampled_from([{"op": text}, _with("configure_skills", enabled=text), _with("send_user_message", x_pad=text)]))
    return "huge_string", [frame(rid, req)], rid


@st.composite
def extra_parts(draw):
    rid, op = draw(ids), draw(ops)
    return "extra_parts", [frame(rid, VALID[op]), *draw(st.lists(st.binary(max_size=64), min_size=1, max_size=3))], rid


PLACEHOLDER = "\x00fuzz\x00"
STRING_FIELDS = [("send_user_message", "content", PLACEHOLDER), ("send_user_message", "loc", [None, PLACEHOLDER]),
                 ("start_conversation", "id", PLACEHOLDER), ("await_generation", "ref", PLACEHOLDER), ("configure_mode", "mode", PLACEHOLDER)]


@st.composite
def invalid_utf8(draw):
    """A valid request but for one string, whose bytes are not UTF-8 (0xFF never is)."""
    rid, (op, field, value) = draw(ids), draw(st.sampled_from(STRING_FIELDS))
    bad = b"\xff" + draw(st.binary(min_size=len(PLACEHOLDER) - 1, max_size=len(PLACEHOLDER) - 1))
    return "invalid_utf8", [frame(rid, _with(op, **{field: value})).replace(PLACEHOLDER.encode(), bad)], rid


@st.composite
def id_not_an_int(draw):
    bad_id, op = draw(st.one_of(st.text(max_size=4), st.none(), st.floats(allow_nan=False))), draw(ops)
    return "id_not_an_int", [frame(bad_id, VALID[op])], 0


cases = st.one_of(
    st.binary(min_size=1, max_size=512).map(lambda b: ("random_bytes", [b], None)),
    st.just(("empty", [b""], 0)),
    msgpack_values.map(lambda value: ("wrong_shape", [msgspec.msgpack.encode(value)], None)),
    truncated(), wrong_version(), unknown_op(), wrong_type(), missing_field(), unknown_field(), huge_string(),
    extra_parts(), invalid_utf8(), id_not_an_int(),
)

CATEGORIES = {"random_bytes", "empty", "truncated", "wrong_shape", "wrong_version", "unknown_op", "wrong_type",
              "missing_field", "unknown_field", "huge_string", "extra_parts", "invalid_utf8", "id_not_an_int"}


def _assert_invalid(parts: list[bytes]) -> None:
    """The case must be one the daemon refuses: a frame our decoder rejects, or more than one part."""
    if len(parts) == 1:
        with pytest.raises(codec.BadRequestFrame):
            codec.decode_request(parts[0])
    else:
        codec.decode_request(parts[0])  # a valid first part: only the extra parts make it bad


def _fingerprint(client) -> tuple:
    """What a fuzzed frame could have changed: the seed conversation's journal, the run
    counters, and whether any probe conversation exists."""
    probes = []
    for project, conv in PROBES:
        for loc in (conv, (project, conv) if project else ("fz-p", conv)):
            try:
                client.conversation(loc)
                probes.append((loc, "exists"))
            except NotFound:
                probes.append((loc, "absent"))
    return client.conversation_thread_entries("fz-seed"), client.telemetry(), probes


def test_valid_templates_are_valid():
    for req in VALID.values():
        codec.decode_request(frame(1, req))


def test_fuzzed_frames_are_answered_bad_request_and_change_nothing(shared_daemon):
    with shared_daemon.client() as client:
        client.send_and_generate("fz-seed", "before the fuzz")
        before = _fingerprint(client)
        assert all(state == "absent" for _, state in before[2])
        rejected_before = client.status().frames_rejected
    seen: set[str] = set()
    sent = 0

    with RawPeer(shared_daemon.endpoint) as peer:

        @settings(max_examples=300, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
        @given(cases)
        def one_bad_frame(case):
            category, parts, request_id = case
            _assert_invalid(parts)
            nonlocal sent
            peer.send(*parts)
            sent += 1
            answer = peer.answer()
            assert isinstance(answer, frames.Failure), answer
            assert answer.error.code == "bad_request", answer.error
            if request_id is not None:
                assert answer.id == request_id
            seen.add(category)

        one_bad_frame()

    assert seen == CATEGORIES
    with shared_daemon.client() as client:
        assert client.ping().pid == shared_daemon.pid
        assert _fingerprint(client) == before
        assert client.status().frames_rejected == rejected_before + sent  # and each one is counted


@given(ids, st.sampled_from(sorted(VALID)), st.data())
def test_the_id_of_a_cut_frame_is_read_from_its_start(rid, op, data):
    whole = frame(rid, VALID[op])
    cut = data.draw(st.integers(0, len(whole)))
    assert codec.peek_request_id(whole[:cut]) == (rid if cut >= _id_end(rid) else 0)
