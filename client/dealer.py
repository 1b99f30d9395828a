"""The client's ZeroMQ socket: a DEALER that names a refused handshake at once.

A daemon that refuses a connection's security handshake (a CURVE key it does not
know, a plaintext client at a CURVE endpoint, the wrong server key) sends nothing a
client could read as an answer, and ZeroMQ quietly retries: the client would wait out
its timeout and say only "no answer". The socket's monitor sees the handshake fail,
so the call fails at once with `DaemonUnavailable` saying why and what to fix.
"""

from __future__ import annotations

import time

import zmq
from zmq.utils.monitor import recv_monitor_message

from genvisor.errors import DaemonUnavailable
from genvisor.ipc.curve import CLIENT_KEY_ENV, SERVER_KEY_ENV, ClientCurve, secure_client_socket

_FAILURES = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


class WatchedDealer:
    """What `Client` needs of a socket (see client.Transport), plus the handshake watch."""

    def __init__(self, endpoint: str, curve: ClientCurve | None) -> None:
        self._endpoint = endpoint
        self._curve = curve
        self._socket = zmq.Context.instance().socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if curve is not None:
            secure_client_socket(self._socket, curve)
        self._monitor = self._socket.get_monitor_socket(_FAILURES)
        self._socket.connect(endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)

    def send(self, data: bytes) -> None:
        self._socket.send(data)

    def recv(self) -> bytes:
        return self._socket.recv()

    def poll(self, timeout_ms: int, flags: int = zmq.POLLIN) -> int:
        """POLLIN once a frame is waiting, 0 at the timeout; a failed handshake raises
        DaemonUnavailable (the caller drops the socket, as after a timeout)."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            ready = dict(self._poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))
            if self._monitor in ready:
                self._refused(recv_monitor_message(self._monitor))
            if self._socket in ready:
                return zmq.POLLIN
            if time.monotonic() >= deadline:
                return 0

    def _refused(self, event: dict) -> None:
        kind, value = event["event"], event["value"]
        where = f"the daemon at {self._endpoint}"
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise DaemonUnavailable(f"{where} refused this client's CURVE key (ZAP status {value}): its public key is not in "
                                    "the daemon's security.authorized_clients_dir")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            need = ("does not use CURVE" if self._curve is not None else
                    f"requires CURVE: pass --server-key and --client-key (or set ${SERVER_KEY_ENV} and ${CLIENT_KEY_ENV})")
            raise DaemonUnavailable(f"{where} {need}")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self._curve is not None:
            raise DaemonUnavailable(f"the CURVE handshake with {where} failed: is the server key its public key?")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            raise DaemonUnavailable(f"{where} broke the ZeroMQ handshake (protocol error {value:#x}): is it a genvisor daemon?")
        # A handshake that failed without detail on a plain socket: no verdict; keep waiting.

    def close(self, linger: int | None = None) -> None:
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)
