"""Length-prefixed msgpack frames over a byte stream (the daemon ⇄ worker channel).

`FrameReader` is the sans-I/O half (bytes in, frames out, in the style of h11);
`FramedChannel` drives it over a Trio stream and serialises concurrent senders.
A stream rather than SOCK_SEQPACKET because a run's context can exceed a socket
buffer, which caps a datagram.
"""

from __future__ import annotations

import struct
from typing import Any, Generic, TypeVar

import msgspec
import trio

from genvisor.limits import MAX_CHANNEL_FRAME

T = TypeVar("T")

_LENGTH = struct.Struct("!I")


class FrameTooLarge(Exception):
    pass


class FrameReader:
    def __init__(self, max_frame: int = MAX_CHANNEL_FRAME) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """The next complete frame, or None until more bytes arrive."""
        if len(self._buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(self._buffer)
        if length > self._max_frame:
            raise FrameTooLarge(f"channel frame of {length} bytes exceeds {self._max_frame}")
        end = _LENGTH.size + length
        if len(self._buffer) < end:
            return None
        frame = bytes(self._buffer[_LENGTH.size : end])
        del self._buffer[:end]
        return frame

    @property
    def pending(self) -> int:
        return len(self._buffer)


def pack_frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


class FramedChannel(Generic[T]):
    """Send any msgspec-encodable value; receive values of the union `receive_type`
    (a type form: `type[T]` cannot spell a union, so the channel's T is given where it
    is declared: `channel: FramedChannel[ToWorker] = ...`)."""

    def __init__(self, stream: trio.SocketStream, receive_type: Any) -> None:
        self._stream = stream
        self._reader = FrameReader()
        self._decoder: msgspec.msgpack.Decoder[T] = msgspec.msgpack.Decoder(receive_type)
        self._encoder = msgspec.msgpack.Encoder()
        self._send_lock = trio.Lock()

    async def send(self, value: Any) -> None:
        data = pack_frame(self._encoder.encode(value))
        async with self._send_lock:
            await self._stream.send_all(data)

    async def receive(self) -> T | None:
        """The next value, or None at end of stream (the peer closed or died)."""
        while True:
            frame = self._reader.next_frame()
            if frame is not None:
                return self._decoder.decode(frame)
            try:
                data = await self._stream.receive_some(256 * 1024)
            except trio.BrokenResourceError:
                # A peer that died with our last frame unread resets the connection
                # (ECONNRESET) instead of closing it: the same end, said differently.
                return None
            if not data:
                return None
            self._reader.feed(data)

    async def aclose(self) -> None:
        await self._stream.aclose()

    def close(self) -> None:
        """`aclose` for code that cannot await (nothing may be using the channel)."""
        self._stream.socket.close()
