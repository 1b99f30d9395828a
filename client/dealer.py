"""The client's ZeroMQ socket: a DEALER that says at once when no daemon can answer.

ZeroMQ hides a missing peer: it queues the request and quietly retries, and a client
would wait out its timeout and say only "no answer". This socket names the cases it
can see instead, at once:

* no daemon: for an ipc endpoint, a plain AF_UNIX connect before the socket is made
  tells a missing socket file, or one nobody listens on (a daemon that was killed
  leaves its file behind), from a daemon that is there;
* a refused handshake (a CURVE key the daemon does not know, a plaintext client at a
  CURVE endpoint, the wrong server key): the socket's monitor sees it fail;
* a daemon gone while a reply is due: the monitor sees the connection drop (the
  daemon exited or was killed, or over tcp stopped answering heartbeats). A daemon
  that restarts knows nothing of the requests of the one before it, so no reply
  will come; a reply that arrived before the drop is still read first.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from genvisor.errors import DaemonUnavailable
from genvisor.ipc.curve import CLIENT_KEY_ENV, SERVER_KEY_ENV, ClientCurve, secure_client_socket
from genvisor.ipc.endpoint import default_endpoint, probe_socket

_FAILURES = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
_WATCHED = _FAILURES | zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
# Over tcp a peer can vanish without a word (its host down, the network cut): ZeroMQ
# heartbeats notice within HEARTBEAT_TIMEOUT_MS and drop the connection.
HEARTBEAT_IVL_MS = 5_000
HEARTBEAT_TIMEOUT_MS = 30_000


def no_daemon(endpoint: str) -> DaemonUnavailable:
    try:
        default = str(default_endpoint())
    except ValueError:  # a malformed $GENVISOR_ENDPOINT: name the endpoint explicitly
        default = ""
    serve = "genvisor serve" if endpoint == default else f"genvisor serve --endpoint {endpoint}"
    return DaemonUnavailable(f"no daemon at {endpoint}; start one with `{serve}`")


def probe_ipc(endpoint: str) -> None:
    """Raise DaemonUnavailable at once if nothing listens at the ipc socket `endpoint`
    names: no such file, or a file nobody accepts connections on. Anything else (a
    full backlog, an error ZeroMQ will report better) is left to ZeroMQ."""
    state = probe_socket(endpoint.removeprefix("ipc://"))
    if state in ("absent", "refused"):
        raise no_daemon(endpoint)
    if state == "denied":
        raise DaemonUnavailable(f"cannot connect to {endpoint}: permission denied (the socket or its directory "
                                "belongs to another user; see ipc_group_access)")


_POLL_SLICE_MS = 3_600_000


class WatchedDealer:
    """What `Client` needs of a socket (see client.Transport), plus the watch above.

    `poll` waits for a frame; `poll_reply` does too, and also raises DaemonUnavailable
    once the connection a request went out on is lost. `connected` is true while a
    handshake has succeeded and the connection holds."""

    def __init__(self, endpoint: str, curve: ClientCurve | None) -> None:
        if endpoint.startswith("ipc://"):
            probe_ipc(endpoint)
        self._endpoint = endpoint
        self._curve = curve
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if endpoint.startswith("tcp://"):
            self._socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
            self._socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
        if curve is not None:
            secure_client_socket(self._socket, curve)
        self._monitor: zmq.Socket[bytes] = self._socket.get_monitor_socket(_WATCHED)
        self._socket.connect(endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self.connected = False
        self.lost = False  # a connection dropped since the last request went out
        self._refusal: DaemonUnavailable | None = None

    def send(self, data: bytes) -> None:
        self._watch()
        self.lost = False  # a drop before this request went out loses nothing of it
        self._socket.send(data)

    def recv(self) -> bytes:
        return self._socket.recv()

    def poll(self, timeout_ms: int, flags: int = zmq.POLLIN) -> int:
        """POLLIN once a frame is waiting, 0 at the timeout; a failed handshake raises
        DaemonUnavailable (the caller drops the socket, as after a timeout)."""
        return self._wait(timeout_ms, reply_due=False)

    def poll_reply(self, timeout_ms: int) -> int:
        """`poll`, for a reply: a connection lost since the request went out raises
        DaemonUnavailable once no frame is left to read."""
        return self._wait(timeout_ms, reply_due=True)

    def _wait(self, timeout_ms: int, reply_due: bool) -> int:
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            self._watch()  # what happened so far, also before this wait (say, while sending)
            if self._refusal is not None:
                raise self._refusal
            # Frames that arrived before the connection went are read first.
            if self._socket.poll(0, zmq.POLLIN):
                return zmq.POLLIN
            if reply_due and self.lost:
                raise DaemonUnavailable(f"the daemon at {self._endpoint} closed the connection before answering "
                                        "(it exited or was killed; a restarted daemon does not answer the old one's requests)")
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                return 0
            # A frame or a monitor event, looked at above. zmq's poll takes a C int of
            # ms: a long wait (an await's timeout may be days) is waited in slices.
            self._poller.poll(min(remaining_ms, _POLL_SLICE_MS))

    def _watch(self) -> None:
        """Take in the monitor's events so far."""
        while self._monitor.poll(0, zmq.POLLIN):
            event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
            elif kind == zmq.EVENT_DISCONNECTED:
                # Only an established connection counts: a failed attempt is retried.
                self.lost = self.lost or self.connected
                self.connected = False
            elif self._refusal is None:
                self._refusal = self._refused(event)

    def _refused(self, event: Mapping[str, Any]) -> DaemonUnavailable | None:
        kind, value = event["event"], event["value"]
        where = f"the daemon at {self._endpoint}"
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return DaemonUnavailable(f"{where} refused this client's CURVE key (ZAP status {value}): its public key is not in "
                                     "the daemon's security.authorized_clients_dir")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            need = ("does not use CURVE" if self._curve is not None else
                    f"requires CURVE: pass --server-key and --client-key (or set ${SERVER_KEY_ENV} and ${CLIENT_KEY_ENV})")
            return DaemonUnavailable(f"{where} {need}")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and self._curve is not None:
            return DaemonUnavailable(f"the CURVE handshake with {where} failed: is the server key its public key?")
        if kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return DaemonUnavailable(f"{where} broke the ZeroMQ handshake (protocol error {value:#x}): is it a genvisor daemon?")
        return None  # a handshake that failed without detail on a plain socket: no verdict; keep waiting

    def close(self, linger: int | None = None) -> None:
        self._socket.disable_monitor()
        self._monitor.close(linger=0)
        self._socket.close(linger=0)
