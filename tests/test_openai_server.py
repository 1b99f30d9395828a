"""Self-test of tests/openai_server.py against the real `openai` SDK over real HTTP."""

from __future__ import annotations

import json
import threading

import openai
import pytest
import trio

from openai_server import FakeOpenAI, drop_mid_stream, error, hang, text, tool_calls

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def fake():
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def client(fake):
    with openai.OpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0, timeout=5) as c:
        yield c


def test_json_text_reply(fake, client):
    fake.reply(text("Hello there, world", usage=(12, 3)))
    completion = client.chat.completions.create(model="gpt-test", messages=MESSAGES, temperature=0)
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-test"
    choice = completion.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hello there, world"
    assert choice.message.tool_calls is None
    assert choice.finish_reason == "stop"
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        12,
        3,
        15,
    )
    assert fake.requests == [{"model": "gpt-test", "messages": MESSAGES, "temperature": 0}]
    assert fake.headers[0]["authorization"] == "Bearer sk-test"
    assert fake.headers[0]["content-type"] == "application/json"
    assert fake.pending == 0


def test_streamed_text_reassembles_with_usage(fake, client):
    fake.reply(text("The quick brown fox", finish_reason="length", usage=(7, 4)))
    stream = client.chat.completions.create(
        model="gpt-test", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.model == "gpt-test" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "The quick brown fox"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert pieces == ["The ", "quick ", "brown ", "fox"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    # The usage chunk comes last, with no choices; the others carry usage null.
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == 7
    assert chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.total_tokens == 11
    assert all(c.usage is None for c in chunks[:-1])
    assert fake.requests[0]["stream"] is True


def test_streamed_text_exact_chunks_without_usage(fake, client):
    fake.reply(text("abcdef", chunks=["ab", "cde", "f"]))
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert pieces == ["ab", "cde", "f"]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    with pytest.raises(ValueError):
        text("abc", chunks=["a", "b"])


def _reassemble_tool_calls(chunks) -> dict[int, dict]:
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta_call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta_call.index, {"id": None, "name": None, "arguments": ""})
            if delta_call.id:
                call["id"] = delta_call.id
            if delta_call.function and delta_call.function.name:
                call["name"] = delta_call.function.name
            if delta_call.function and delta_call.function.arguments:
                call["arguments"] += delta_call.function.arguments
    return calls


def test_streamed_tool_calls_reassemble(fake, client):
    args0 = json.dumps({"path": "src/main.py", "start": 1, "end": 40})
    args1 = json.dumps({"command": "pytest -q tests/test_x.py"})
    fake.reply(tool_calls([("read_file", args0), ("bash", args1)]))
    chunks = list(client.chat.completions.create(model="m", messages=MESSAGES, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    calls = _reassemble_tool_calls(chunks)
    assert calls == {
        0: {"id": "call_0", "name": "read_file", "arguments": args0},
        1: {"id": "call_1", "name": "bash", "arguments": args1},
    }
    # Arguments really are split, and later pieces carry only index + arguments.
    pieces = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(pieces) > 4
    later = [tc for tc in pieces if tc.id is None]
    assert later and all(tc.function.name is None and tc.type is None for tc in later)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_json_tool_calls(fake, client):
    fake.reply(tool_calls([("bash", '{"command": "ls"}')], content="Let me look."))
    message = client.chat.completions.create(model="m", messages=MESSAGES).choices[0].message
    assert message.content == "Let me look."
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in message.tool_calls] == [
        ("call_0", "function", "bash", '{"command": "ls"}')
    ]


def test_rate_limit_error(fake, client):
    fake.reply(error(429, code="rate_limit_exceeded", message="slow down", type_="requests"))
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="m", messages=MESSAGES)
    exc = info.value
    assert exc.status_code == 429
    assert exc.response.status_code == 429
    assert exc.code == "rate_limit_exceeded"
    assert exc.body == {"message": "slow down", "type": "requests", "param": None, "code": "rate_limit_exceeded"}
    assert exc.type == "requests"
    assert exc.request_id and exc.request_id.startswith("req_fake")


def test_authentication_error(fake, client):
    fake.reply(error(401, code="invalid_api_key", message="Incorrect API key provided"))
    with pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert info.value.status_code == 401
    assert info.value.code == "invalid_api_key"


def test_drop_mid_stream(fake, client):
    fake.reply(drop_mid_stream(["Hello ", "wor"]))
    received = []
    with pytest.raises(openai.APIConnectionError) as info:
        for chunk in client.chat.completions.create(model="m", messages=MESSAGES, stream=True):
            received.append(chunk.choices[0].delta.content)
    # Exactly openai.APIConnectionError (not its APITimeoutError subclass), from the
    # transport's incomplete chunked read.
    assert type(info.value) is openai.APIConnectionError
    assert type(info.value.__cause__).__name__ == "RemoteProtocolError"
    assert received == ["", "Hello ", "wor"]


def test_drop_non_streamed(fake, client):
    fake.reply(drop_mid_stream(2))
    with pytest.raises(openai.APIConnectionError) as info:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert type(info.value) is openai.APIConnectionError


def test_hang_times_out(fake, client):
    fake.reply(hang())
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="m", messages=MESSAGES, timeout=0.5)
    assert fake.hanging.is_set()


def test_empty_queue_is_loud(fake, client):
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="m", messages=MESSAGES)
    assert info.value.status_code == 500
    assert "no response was queued" in info.value.message
    assert info.value.code == "no_response_queued"
    assert len(fake.requests) == 1


def test_exit_releases_a_hanging_request():
    outcome: list[BaseException] = []
    with FakeOpenAI() as fake:
        fake.reply(hang())
        client = openai.OpenAI(base_url=fake.base_url, api_key="k", max_retries=0, timeout=30)

        def call() -> None:
            try:
                client.chat.completions.create(model="m", messages=MESSAGES)
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
                outcome.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        assert fake.hanging.wait(5)
    caller.join(5)
    assert not caller.is_alive()
    assert len(outcome) == 1 and type(outcome[0]) is openai.APIConnectionError
    client.close()


async def test_async_client_under_trio(fake):
    client = openai.AsyncOpenAI(base_url=fake.base_url, api_key="k", max_retries=0, timeout=5)
    fake.reply(text("one two three"))
    fake.reply(hang(chunks_before_hang=["par", "tial"]))
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "one two three"

    # A stream that hangs mid-way is cancelled from outside after its first chunks.
    received = []
    with trio.move_on_after(5) as scope:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
            if len(received) == 3:
                assert fake.hanging.is_set() or await trio.to_thread.run_sync(fake.hanging.wait, 5)
                scope.cancel()
    assert scope.cancelled_caught
    assert received == ["", "par", "tial"]
    await client.close()
