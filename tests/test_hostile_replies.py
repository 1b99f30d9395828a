"""A model server that answers 200 with the wrong shapes: each such reply ends its run
with a typed LLMError, and the daemon goes on serving every other conversation."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import OPENAI_KEY_ENV, Daemon, openai_config
from genvisor.errors import LLMError
from openai_server import FakeOpenAI, raw, text


def _completion(**overrides):
    message = overrides.pop("message", {"role": "assistant", "content": "fine"})
    choice = {"index": 0, "message": message, "finish_reason": "stop", **overrides.pop("choice", {})}
    return {"id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "m", "choices": [choice],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}, **overrides}


def _chunk(delta=None, **overrides):
    choice = {"index": 0, "delta": delta if delta is not None else {"content": "x"}, "finish_reason": None, **overrides.pop("choice", {})}
    return {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice], **overrides}


MALFORMED = {
    "model_is_a_number": _completion(model=123),
    "finish_reason_is_a_number": _completion(choice={"finish_reason": 7}),
    "content_is_an_object": _completion(message={"role": "assistant", "content": {"nested": True}}),
    "content_is_a_list": _completion(message={"role": "assistant", "content": [1, 2]}),
    "choices_is_an_object": {**_completion(), "choices": {"0": {}}},
    "choice_has_no_message": _completion(choice={"message": None}),
    "usage_is_text": _completion(usage={"prompt_tokens": "many", "completion_tokens": 1, "total_tokens": 1}),
    "tool_call_without_function": _completion(message={"role": "assistant", "content": None,
                                                       "tool_calls": [{"id": "c", "type": "function", "function": None}]}),
    "tool_call_name_is_a_number": _completion(message={"role": "assistant", "content": None,
                                                       "tool_calls": [{"id": "c", "type": "function", "function": {"name": 5, "arguments": "{}"}}]}),
    "body_is_a_list": [1, 2, 3],
    "body_is_a_string": "hello",
    "body_is_null": None,
}
MALFORMED_STREAMS = {
    "delta_content_is_a_number": [_chunk({"content": 5}), _chunk({}, choice={"finish_reason": "stop"})],
    "finish_reason_is_a_number": [_chunk(), _chunk({}, choice={"finish_reason": 7})],
    "choices_is_a_string": [{**_chunk(), "choices": "no"}],
    "model_is_a_list": [_chunk(model=[1]), _chunk({}, model=[1], choice={"finish_reason": "stop"})],
    "tool_call_index_is_text": [_chunk({"tool_calls": [{"index": "a", "id": "c", "function": {"name": "x", "arguments": ""}}]}),
                                _chunk({}, choice={"finish_reason": "tool_calls"})],
}


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def daemon(fake, tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("hostile"), openai_config(fake.base_url), env={OPENAI_KEY_ENV: "sk-test"}).start()
    yield d
    assert d.stop() == 0, d.log()


def _generate(daemon, conv, stream: bool) -> LLMError | str:
    with daemon.client() as client:
        client.send_user_message(conv, "hi")
        ref = client.generate_assistant_reply(conv, backend="local", stream=stream)
        try:
            return client.await_generation(conv, ref).text
        except LLMError as error:
            return error


def _serves_on(daemon, fake, conv) -> None:
    fake.reply(text("still here"))
    assert _generate(daemon, conv + "_next", stream=False) == "still here"


CASES = [(name, False) for name in sorted(MALFORMED)] + [(name, True) for name in sorted(MALFORMED_STREAMS)]


@pytest.mark.parametrize(("name", "stream"), CASES, ids=[f"{'stream' if stream else 'reply'}-{name}" for name, stream in CASES])
def test_a_malformed_reply_or_stream_is_a_typed_error_of_its_run(daemon, fake, conv, name, stream):
    fake.reply(raw((MALFORMED_STREAMS if stream else MALFORMED)[name]))
    outcome = _generate(daemon, conv, stream=stream)
    assert isinstance(outcome, LLMError), outcome
    assert outcome.category in ("provider", "transport"), outcome
    with daemon.client() as client:
        assert [m.role for m in client.conversation_messages(conv)] == ["user"]  # nothing committed
    _serves_on(daemon, fake, conv)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=10,
)
# A completion with each field replaced, sometimes, by any JSON value: close enough to
# the format to get past the first checks, wrong somewhere inside.
fields = st.fixed_dictionaries({}, optional={
    "model": json_values, "usage": json_values, "choices": json_values, "id": json_values,
    "message": st.fixed_dictionaries({}, optional={"role": json_values, "content": json_values, "tool_calls": json_values}),
})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=fields)
def test_any_reply_of_any_shape_ends_its_run_once_and_the_daemon_serves_on(daemon, fake, conv, overrides):
    message = overrides.pop("message", None)
    body = _completion(**overrides) if message is None else _completion(message=message, **overrides)
    fake.reply(raw(body))
    outcome = _generate(daemon, conv, stream=False)
    assert isinstance(outcome, (str, LLMError))
    if isinstance(outcome, LLMError):
        assert outcome.category in ("provider", "transport"), outcome
    assert daemon.process.poll() is None
