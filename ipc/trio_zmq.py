"""A Trio adapter for a pyzmq socket, correct when many tasks send while one receives.

The pitfall it exists for: the file descriptor ZeroMQ exposes (`zmq.FD`) is an
edge-triggered *signal* that "events may have changed", not a level. Any call on the
socket (a send by another task included) may consume that edge while processing
ZeroMQ's internal commands, so a receiver parked on the fd can sleep forever with a
message waiting. The cure, as in pyzmq's own asyncio adapter: after every send and
recv, re-read `zmq.EVENTS` and wake whoever can now make progress; a single watcher
task per socket owns the fd (Trio allows one waiter per fd).

Usage::

    async with TrioSocket.open(zmq_socket) as sock:
        await sock.send_multipart([b"x"])
        frames = await sock.recv_multipart()
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import trio
import zmq


class TrioSocket:
    def __init__(self, socket: zmq.Socket[bytes]) -> None:
        self._socket = socket
        self._fd = socket.fileno()  # zmq.FD
        self._readable = trio.lowlevel.ParkingLot()
        self._writable = trio.lowlevel.ParkingLot()
        self._writable_callbacks: list[Callable[[], object]] = []
        self._closed = False

    @classmethod
    @asynccontextmanager
    async def open(cls, socket: zmq.Socket[bytes]) -> AsyncIterator[TrioSocket]:
        """Adopt `socket` for the life of the block; the socket is closed at its end."""
        adapter = cls(socket)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(adapter._watch)
                try:
                    yield adapter
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            adapter.close()

    @property
    def zmq_socket(self) -> zmq.Socket[bytes]:
        return self._socket

    async def send_multipart(self, frames: Sequence[bytes]) -> None:
        while True:
            self._check_open()
            try:
                self._socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:
                await self._writable.park()
        self._wake_by_events()
        # Yield so a sender in a tight loop cannot starve the rest of the program.
        await trio.lowlevel.checkpoint()

    def try_send_multipart(self, frames: Sequence[bytes]) -> bool:
        """Send without waiting: False if the socket cannot take the frames now (EAGAIN).
        Other errors (EHOSTUNREACH from a ROUTER_MANDATORY socket) are raised."""
        self._check_open()
        try:
            self._socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            return False
        finally:
            self._wake_by_events()

    def on_writable(self, callback: Callable[[], object]) -> None:
        """Call `callback` whenever the socket reports it can send (POLLOUT after a send,
        a receive or a signal on its fd). For a ROUTER_MANDATORY socket that means "some
        peer's pipe has room", which says nothing of any one peer."""
        self._writable_callbacks.append(callback)

    async def recv_multipart(self) -> list[bytes]:
        while True:
            self._check_open()
            try:
                frames = self._socket.recv_multipart(zmq.NOBLOCK)
                break
            except zmq.Again:
                await self._readable.park()
        self._wake_by_events()
        await trio.lowlevel.checkpoint()
        return frames

    def _wake_by_events(self) -> None:
        """Re-read the level state; this may consume the fd's edge, so wake for it."""
        if self._closed:
            return
        events = self._socket.getsockopt(zmq.EVENTS)
        assert isinstance(events, int)  # an int option (pyzmq types every getsockopt as int | bytes)
        if events & zmq.POLLIN:
            self._readable.unpark_all()
        if events & zmq.POLLOUT:
            self._writable.unpark_all()
            for callback in self._writable_callbacks:
                callback()

    async def _watch(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self._fd)
                self._wake_by_events()
        except trio.ClosedResourceError:
            return

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("socket is closed")

    def close(self) -> None:
        """Close the socket (linger 0); parked senders and receivers get ClosedResourceError."""
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self._fd)
        self._readable.unpark_all()
        self._writable.unpark_all()
        self._socket.close(linger=0)
