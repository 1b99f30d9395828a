"""The wire: every frame type round-trips; bad frames get BadRequest and change nothing."""

from __future__ import annotations

import msgspec
import pytest

from genvisor.errors import _BY_CODE, BadRequest, Diagnostic, ErrorInfo, GenvisorError, InvalidOptions, LLMError
from genvisor.ipc import codec, frames
from genvisor.ipc.channel import FrameReader, FrameTooLarge, pack_frame
from genvisor.ipc.endpoint import EndpointError, parse_endpoint
from genvisor.types import (
    Conversation,
    DaemonInfo,
    DerivedState,
    GenerationCanceled,
    GenerationEvent,
    GenerationResult,
    LLMResult,
    ToolCall,
)
from raw_peer import RawPeer

LOC = frames.Locator("proj", "c1")
REQUESTS = [
    frames.Ping(),
    frames.SendUserMessage(LOC, "hi", {"k": 1}),
    frames.GetConversation(frames.Locator(None, "c")),
    frames.GenerateAssistantReply(LOC, {"backend_opts": {"reply": "x"}, "events": True}),
    frames.AwaitGeneration(LOC, "gen_x", 5, False, "why"),
    frames.CancelGeneration(LOC, "stop"),
    frames.SendAndGenerate(LOC, "hi", None, {"model": "m"}, 100, True, "await_timeout"),
]


@pytest.mark.parametrize("request_", REQUESTS, ids=lambda r: type(r).__name__)
def test_every_request_round_trips(request_):
    decoded = codec.decode_request(codec.encode_request(7, request_))
    assert decoded == frames.ClientFrame(v=frames.PROTOCOL_VERSION, id=7, req=request_)


RESULT = LLMResult(request_id="r", conversation_id="c", backend="scripted", text="t")
BODIES = [
    (DaemonInfo("0.1", 1, 2.5, "ipc:///x"), DaemonInfo),
    (Conversation("c", None, {}, DerivedState()), Conversation),
    (frames.GenerationRef("gen_1"), frames.GenerationRef),
    (RESULT, LLMResult),
    (frames.Empty(), frames.Empty),
    (frames.ConversationAndResult(Conversation("c", "p", {"project_id": "p"}, DerivedState()), RESULT), frames.ConversationAndResult),
]


@pytest.mark.parametrize(("body", "type_"), BODIES, ids=lambda b: type(b).__name__)
def test_every_reply_body_round_trips(body, type_):
    frame = codec.decode_server_frame(codec.encode_reply(3, body))
    assert isinstance(frame, frames.Reply) and frame.id == 3
    assert codec.decode_body(frame.body, type_) == body


NOTES = [
    GenerationEvent("gen_1", "delta", 2, text="abc"),
    GenerationEvent("gen_1", "tool_call", 3, tool_call=ToolCall("t1", "read_file", '{"path": "a"}')),
    GenerationResult("gen_1", result=RESULT),
    GenerationResult("gen_1", error=LLMError("provider", "down").info()),
    GenerationCanceled("gen_1", "cancel_requested"),
]


@pytest.mark.parametrize("note", NOTES, ids=lambda n: type(n).__name__)
def test_every_notification_round_trips(note):
    frame = codec.decode_server_frame(codec.encode_notification(note))
    assert frame == frames.Notify(v=frames.PROTOCOL_VERSION, note=note)


def _sample(cls: type[GenvisorError]) -> GenvisorError:
    samples = {
        "invalid_options": lambda: InvalidOptions("timeout_ms", "must be an int"),
        "generation_canceled": lambda: cls("user", "gen_1"),
        "llm_error": lambda: LLMError("transport", "reset", details={"status": 0}),
        "unsupported_mode": lambda: cls("chat", ["coding"]),
        "invalid_mode_config": lambda: cls("coding", [Diagnostic("type", "/x", "bad")]),
        "revert_conflict": lambda: cls("gen_1", ["a.txt", "b/c.txt"]),
    }
    return samples.get(cls.code, lambda: cls("something"))()


@pytest.mark.parametrize("cls", list(_BY_CODE.values()), ids=lambda c: c.code)
def test_every_error_crosses_the_wire_with_its_fields(cls):
    error = _sample(cls)
    info = codec.decode_server_frame(codec.encode_failure(1, error.info())).error
    back = info.to_exception()
    assert type(back) is cls and back.info() == error.info()


def test_an_unknown_error_code_from_a_newer_daemon_keeps_its_message():
    back = ErrorInfo(code="from_the_future", message="hm").to_exception()
    assert type(back) is GenvisorError and "hm" in str(back)


def test_llm_error_retryable_defaults_follow_the_category():
    assert [LLMError(c, "m").retryable for c in ("timeout", "provider", "transport")] == [True] * 3
    assert [LLMError(c, "m").retryable for c in ("config", "auth", "canceled", "unknown")] == [False] * 4


def test_channel_frames_reassemble_from_any_split():
    payloads = [b"", b"a", b"x" * 70_000]
    data = b"".join(pack_frame(p) for p in payloads)
    for step in (1, 3, 4096):
        reader, out = FrameReader(), []
        for i in range(0, len(data), step):
            reader.feed(data[i : i + step])
            while (frame := reader.next_frame()) is not None:
                out.append(frame)
        assert out == payloads and reader.pending == 0


def test_channel_refuses_a_frame_over_its_limit():
    reader = FrameReader(max_frame=10)
    reader.feed(pack_frame(b"x" * 11))
    with pytest.raises(FrameTooLarge):
        reader.next_frame()


@pytest.mark.parametrize("text", ["", "ipc://relative", "http://x", "tcp://host", "tcp://host:99999", "ipc://"])
def test_bad_endpoints_are_refused(text):
    with pytest.raises(EndpointError):
        parse_endpoint(text)


# ---- against a live daemon ------------------------------------------------------------


def _raw_exchange(endpoint: str, *parts: bytes) -> frames.Failure:
    with RawPeer(endpoint) as peer:
        peer.send(*parts)
        return peer.answer()


def _frame_with(**fields) -> bytes:
    base = {"v": frames.PROTOCOL_VERSION, "id": 41, "req": {"op": "ping"}}
    base.update(fields)
    return msgspec.msgpack.encode(base)


BAD_FRAMES = {
    "garbage": [b"\xff\x00garbage"],
    "truncated": [codec.encode_request(41, frames.SendUserMessage(LOC, "hello"))[:-3]],
    "wrong_version": [_frame_with(v=99)],
    "unknown_op": [_frame_with(req={"op": "format_disk"})],
    "wrong_type": [_frame_with(req={"op": "send_user_message", "loc": [None, "c"], "content": 5})],
    "unknown_field": [_frame_with(req={"op": "ping", "extra": 1})],
    "two_parts": [codec.encode_request(41, frames.Ping()), b"tail"],
    "invalid_utf8": [codec.encode_request(41, frames.SendUserMessage(LOC, "hello")).replace(b"hello", b"\xff\xfehel")],
    "oversized": [_frame_with(req={"op": "send_user_message", "loc": [None, "c"], "content": "x" * (frames.MAX_FRAME_BYTES + 1)})],
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_frames_get_bad_request_and_the_daemon_keeps_serving(shared_daemon, name):
    answer = _raw_exchange(shared_daemon.endpoint, *BAD_FRAMES[name])
    assert isinstance(answer, frames.Failure)
    assert isinstance(answer.error.to_exception(), BadRequest)
    if name != "garbage":
        assert answer.id == 41  # the id was readable (even from the start of a cut or oversized frame)
    with shared_daemon.client() as client:
        assert client.ping().pid == shared_daemon.pid
        # Nothing was recorded by the rejected frames.
        with pytest.raises(Exception) as raised:
            client.conversation("c")
        assert type(raised.value).__name__ == "NotFound"
