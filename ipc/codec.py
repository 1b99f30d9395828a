"""Encoding and decoding of client ⇄ daemon frames, with the edge's error rules.

Decoders are built once per direction (msgspec's fast path). Anything a client sends
that does not decode — truncated, wrong types, unknown operation, wrong protocol
version, oversized — becomes `BadRequest` with a detail that says what was wrong;
the daemon answers it and carries on.
"""

from __future__ import annotations

import struct
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
    RawNotify,
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

    v: Any = 0  # any type: a wrong one is reported as such, and the id still read
    id: int = 0


_head_decoder = msgspec.msgpack.Decoder(_Head)

# msgspec reports a string that is not valid UTF-8 as UnicodeDecodeError, and nesting
# deeper than the interpreter's stack as RecursionError, not as a DecodeError: without
# them here, such a frame would escape unanswered.
_UNDECODABLE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)

# How deep a free-form value (metadata, options, mode_state) may nest. Real ones nest a
# few levels; one that decodes near the interpreter's recursion limit would be accepted,
# journaled, and then fail every reply that carries it (a reply nests it deeper still).
MAX_VALUE_DEPTH = 64


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def encode_request(request_id: int, request: AnyRequest) -> bytes:
    return _encoder.encode(ClientFrame(v=PROTOCOL_VERSION, id=request_id, req=request))


def decode_request(data: bytes) -> ClientFrame:
    """Decode a client frame or raise `BadRequestFrame` (which knows the request id)."""
    if len(data) > MAX_FRAME_BYTES:
        raise BadRequestFrame(peek_request_id(data), f"frame of {len(data)} bytes exceeds the {MAX_FRAME_BYTES}-byte limit")
    try:
        frame = _client_frame_decoder.decode(data)
    except _UNDECODABLE as exc:
        head = _peek_head(data)
        if head is not None and head.v != PROTOCOL_VERSION:
            raise BadRequestFrame(head.id, f"unsupported protocol version {head.v} (this daemon speaks {PROTOCOL_VERSION})") from None
        raise BadRequestFrame(head.id if head else _leading_id(data), f"malformed frame: {exc}") from None
    if frame.v != PROTOCOL_VERSION:
        raise BadRequestFrame(frame.id, f"unsupported protocol version {frame.v} (this daemon speaks {PROTOCOL_VERSION})")
    for field, value in zip(frame.req.__struct_fields__, msgspec.structs.astuple(frame.req), strict=True):
        if isinstance(value, (dict, list)) and (problem := _not_json_like(value)):
            raise BadRequestFrame(frame.id, f"{field}: {problem}")
    return frame


def _not_json_like(value: dict[Any, Any] | list[Any]) -> str | None:
    """What keeps a free-form value (metadata, options, mode_state) from being plain
    JSON-like data, or None. Such a value is journaled, handed back in every answer
    about its conversation and sent on to model servers: a mapping key that is not a
    string would make those answers undecodable as their types (and the journal
    unreadable at the next start); bytes have no JSON form; nesting near the
    interpreter's recursion limit would fail every reply that carries it."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_VALUE_DEPTH:
            return f"nests deeper than {MAX_VALUE_DEPTH} levels"
        if isinstance(item, dict):
            for key in item:
                if not isinstance(key, str):
                    return f"mapping keys must be strings, not {type(key).__name__} ({key!r:.40})"
            children = item.values()
        else:
            children = item
        for child in children:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
            elif isinstance(child, (bytes, bytearray, memoryview)):
                return "bytes are not allowed in a free-form value (use a string)"
    return None


class BadRequestFrame(BadRequest):
    """A `BadRequest` that remembers which request id to answer."""

    def __init__(self, request_id: int, detail: str) -> None:
        self.request_id = request_id
        super().__init__(detail)


def _peek_head(data: bytes) -> _Head | None:
    try:
        return _head_decoder.decode(data)
    except _UNDECODABLE:
        return None


def peek_request_id(data: bytes) -> int:
    """The id of a frame that will not be decoded (0 if none can be read), so that
    the answer to it still finds its request."""
    if len(data) <= MAX_FRAME_BYTES:
        head = _peek_head(data)
        if head is not None:
            return head.id
    return _leading_id(data)


def _leading_id(data: bytes) -> int:
    """`id` read from the first two entries of the frame's msgpack map (`v` and `id`
    lead a ClientFrame), without decoding the rest: the frame may be oversized (the
    cost the limit avoids) or cut short. 0 when those entries are not there."""
    try:
        pos = _MAP_HEADER[data[0]]
        for _ in range(2):
            key, pos = _read_short_str(data, pos)
            value, pos = _read_int(data, pos)
            if key == b"id":
                return value
    except (IndexError, KeyError, ValueError, struct.error):
        pass
    return 0


# msgpack's wire format, the parts _leading_id reads: a map header's length by its
# first byte (fixmap, map16, map32), and the ints by their tag.
_MAP_HEADER = {**{tag: 1 for tag in range(0x80, 0x90)}, 0xDE: 3, 0xDF: 5}
_INT_FORMATS = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}


def _read_short_str(data: bytes, pos: int) -> tuple[bytes, int]:
    length = data[pos] - 0xA0  # fixstr: up to 31 bytes, which every key of ours is
    if not 0 <= length < 32:
        raise ValueError("not a short string")
    return data[pos + 1 : pos + 1 + length], pos + 1 + length


def _read_int(data: bytes, pos: int) -> tuple[int, int]:
    tag = data[pos]
    if tag <= 0x7F or tag >= 0xE0:  # positive / negative fixint: the tag is the value
        return struct.unpack_from(">b" if tag >= 0xE0 else ">B", data, pos)[0], pos + 1
    fmt = _INT_FORMATS[tag]
    return struct.unpack_from(fmt, data, pos + 1)[0], pos + 1 + struct.calcsize(fmt)


def encode_reply(request_id: int, body: Any) -> bytes:
    return _encoder.encode(Reply(v=PROTOCOL_VERSION, id=request_id, body=msgspec.Raw(_encoder.encode(body))))


def encode_failure(request_id: int, error: ErrorInfo) -> bytes:
    return _encoder.encode(Failure(v=PROTOCOL_VERSION, id=request_id, error=error))


def encode_notification(note: Notification) -> bytes:
    return _encoder.encode(Notify(v=PROTOCOL_VERSION, note=note))


def encode_event_notification(event_frame: bytes) -> bytes:
    """The `Notify` frame of an event already encoded (as a worker sent it)."""
    return _encoder.encode(RawNotify(v=PROTOCOL_VERSION, note=msgspec.Raw(event_frame)))


def decode_server_frame(data: bytes) -> ServerFrame:
    return _server_frame_decoder.decode(data)


def decode_body(body: msgspec.Raw, type_: type[T]) -> T:
    return msgspec.msgpack.decode(body, type=type_)
