"""A bare ZeroMQ DEALER for the tests that send what no `Client` would: bad frames,
extra parts, oversized frames, no CURVE. Its monitor lets a test wait for a
connection event (a refused handshake, a dropped connection) instead of sleeping."""

from __future__ import annotations

import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from genvisor.ipc import codec
from genvisor.ipc.frames import ServerFrame


class RawPeer:
    def __init__(self, endpoint: str, events: int = 0) -> None:
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.monitor = self.socket.get_monitor_socket(events) if events else None
        self.socket.connect(endpoint)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
        self.socket.close(linger=0)

    def send(self, *parts: bytes) -> None:
        self.socket.send_multipart(list(parts))

    def answer(self, timeout_s: float = 10) -> ServerFrame:
        assert self.socket.poll(int(timeout_s * 1000)), f"no answer within {timeout_s}s"
        return codec.decode_server_frame(self.socket.recv())

    def wait_for_event(self, kinds: int, timeout_s: float = 10) -> dict:
        """The next monitor event among `kinds` (others are skipped)."""
        assert self.monitor is not None
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            if self.monitor.poll(int(remaining * 1000)):
                event = recv_monitor_message(self.monitor)
                if event["event"] & kinds:
                    return event
        raise AssertionError(f"no monitor event {kinds:#x} within {timeout_s}s")
