"""Frames to many ZeroMQ peers through one ROUTER socket: none lost, none held up by another.

A ROUTER socket silently drops a frame whose peer's pipe is full (its high-water
mark): a client slow to read lost its replies and terminal notifications. With
ROUTER_MANDATORY the socket refuses instead (EAGAIN) and the frame is kept here:
every peer has a queue of its own, sent in order, and a peer that cannot take more is
retried later while the others are served: when ZeroMQ signals that *some* pipe has
room (it never says whose), or on a short timer.

A peer that has gone away (EHOSTUNREACH: its connection closed) has its queue
dropped — nobody is left to read it. How much a peer may leave unread is not decided
here (see daemon.front); this only reports the bytes that left its queue (`on_done`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import trio
import zmq

from genvisor.ipc.trio_zmq import TrioSocket

# Frames ZeroMQ itself may hold for one peer (SNDHWM; its default is 1 000). Beyond it
# a frame waits in the peer's queue here, where the front counts its bytes: ZeroMQ's
# pipe counts frames, so 1 000 large replies could pin gigabytes unseen.
PEER_PIPE_FRAMES = 16
# Frames sent to one peer before the next peer's turn (and a checkpoint).
TURN_FRAMES = 64
RETRY_S = 0.05


def configure_router(socket: zmq.Socket[bytes]) -> None:
    socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    socket.setsockopt(zmq.SNDHWM, PEER_PIPE_FRAMES)


class RouterOutbox:
    def __init__(self, sock: TrioSocket, on_done: Callable[[bytes, int], None] = lambda peer, nbytes: None) -> None:
        self._sock = sock
        self._on_done = on_done
        self._queues: dict[bytes, collections.deque[bytes]] = {}
        self._ready: collections.deque[bytes] = collections.deque()  # peers with frames, not refused lately
        self._blocked: set[bytes] = set()  # peers whose pipe was full at the last try
        # The sender parks here: new frames, or ZeroMQ saying some pipe has room, wake it.
        self._lot = trio.lowlevel.ParkingLot()
        sock.on_writable(self._lot.unpark_all)
        self._empty = trio.Event()
        self._empty.set()

    def put(self, peer: bytes, data: bytes) -> None:
        queue = self._queues.get(peer)
        if queue is None and self._send_now(peer, data):
            return  # the common case: nothing waiting for this peer, and its pipe had room
        if queue is None:
            queue = self._queues[peer] = collections.deque()
            self._ready.append(peer)
            if self._empty.is_set():
                self._empty = trio.Event()
        queue.append(data)
        self._lot.unpark_all()

    async def drained(self) -> None:
        """Return once every queued frame has been handed to ZeroMQ (or dropped)."""
        await self._empty.wait()

    async def run(self) -> None:
        while True:
            await self._send_ready()
            if self._blocked:
                # Until new frames come or some pipe has room (ZeroMQ cannot say whose),
                # or RETRY_S has passed: a safety net, as that signal is an edge.
                with trio.move_on_after(RETRY_S):
                    await self._lot.park()
                self._ready.extend(self._blocked)
                self._blocked.clear()
            else:
                await self._lot.park()  # nothing queued: `put` wakes it

    async def _send_ready(self) -> None:
        while self._ready:
            peer = self._ready.popleft()
            if self._send_turn(peer):
                self._ready.append(peer)  # more to send: after the others
            await trio.lowlevel.checkpoint()
        if not self._queues:
            self._empty.set()

    def _send_now(self, peer: bytes, data: bytes) -> bool:
        """Hand `data` to ZeroMQ at once if it takes it; False to queue it (a full pipe)."""
        try:
            if not self._sock.try_send_multipart([peer, data]):
                return False
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            # gone: nobody can read it (counted as done, like a dropped queue)
        self._on_done(peer, len(data))
        return True

    def _send_turn(self, peer: bytes) -> bool:
        """Send up to TURN_FRAMES of `peer`'s frames; True if it has more and may take them."""
        queue = self._queues[peer]
        for _ in range(TURN_FRAMES):
            try:
                sent = self._sock.try_send_multipart([peer, queue[0]])
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EHOSTUNREACH:
                    raise
                del self._queues[peer]
                self._on_done(peer, sum(map(len, queue)))
                return False
            if not sent:
                self._blocked.add(peer)
                return False
            self._on_done(peer, len(queue.popleft()))
            if not queue:
                del self._queues[peer]
                return False
        return True
