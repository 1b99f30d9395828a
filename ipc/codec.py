"""Encoding and decoding of client ⇄ daemon frames, with the edge's error rules.

Decoders are built once per direction (msgspec's fast path). Anything a client sends
that does not decode — truncated, wrong types, unknown operation, wrong protocol
version, oversized — becomes `BadRequest` with a detail that says what was wrong;
the daemon answers it and carries on.
"""

from __future__ import annotations

from typing import Any, TypeVar

import msgspec

from genvisor.errors import BadRequest, ErrorInfo
from genvisor.ipc.frames import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    AnyRequest,
    ClientFrame,
    Failure,
    Notify,
    Reply,
    ServerFrame,
)
from genvisor.types import Notification

T = TypeVar("T")

_encoder = msgspec.msgpack.Encoder()
_client_frame_decoder = msgspec.msgpack.Decoder(ClientFrame)
_server_frame_decoder = msgspec.msgpack.Decoder(ServerFrame)


class _Head(msgspec.Struct):
    """The part of a frame read to answer even a frame that fails to decode."""

    v: int = 0
    id: int = 0


_head_decoder = msgspec.msgpack.Decoder(_Head)


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def encode_request(request_id: int, request: AnyRequest) -> bytes:
    return _encoder.encode(ClientFrame(v=PROTOCOL_VERSION, id=request_id, req=request))


def decode_request(data: bytes) -> ClientFrame:
    """Decode a client frame or raise `BadRequestFrame` (which knows the request id)."""
    if len(data) > MAX_FRAME_BYTES:
        raise BadRequestFrame(_peek_id(data), f"frame of {len(data)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    try:
        frame = _client_frame_decoder.decode(data)
    except msgspec.DecodeError as exc:
        head = _peek_head(data)
        if head is not None and head.v != PROTOCOL_VERSION:
            raise BadRequestFrame(head.id, f"unsupported protocol version {head.v} (this daemon speaks {PROTOCOL_VERSION})") from None
        raise BadRequestFrame(head.id if head else 0, f"malformed frame: {exc}") from None
    if frame.v != PROTOCOL_VERSION:
        raise BadRequestFrame(frame.id, f"unsupported protocol version {frame.v} (this daemon speaks {PROTOCOL_VERSION})")
    return frame


class BadRequestFrame(BadRequest):
    """A `BadRequest` that remembers which request id to answer."""

    def __init__(self, request_id: int, detail: str) -> None:
        self.request_id = request_id
        super().__init__(detail)


def _peek_head(data: bytes) -> _Head | None:
    try:
        return _head_decoder.decode(data)
    except msgspec.DecodeError:
        return None


def _peek_id(data: bytes) -> int:
    # Only peek at the start of an oversized frame: decoding all of it is the cost the
    # limit exists to avoid. A truncated prefix rarely decodes; then the id is 0.
    head = _peek_head(data[:64])
    return head.id if head else 0


def encode_reply(request_id: int, body: Any) -> bytes:
    return _encoder.encode(Reply(v=PROTOCOL_VERSION, id=request_id, body=msgspec.Raw(_encoder.encode(body))))


def encode_failure(request_id: int, error: ErrorInfo) -> bytes:
    return _encoder.encode(Failure(v=PROTOCOL_VERSION, id=request_id, error=error))


def encode_notification(note: Notification) -> bytes:
    return _encoder.encode(Notify(v=PROTOCOL_VERSION, note=note))


def decode_server_frame(data: bytes) -> ServerFrame:
    return _server_frame_decoder.decode(data)


def decode_body(body: msgspec.Raw, type_: type[T]) -> T:
    return msgspec.msgpack.decode(body, type=type_)
