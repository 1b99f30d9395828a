"""The sockets of the daemon ⇄ node-agent link (ipc.node's frames travel on them).

One ZeroMQ DEALER each side, over tcp, with CURVE: the agent is the server and lets in
only its daemon's public key (given to it through Ray, which the cluster trusts); the
daemon is the client of each agent it was told of, by the agent's public key.
"""

from __future__ import annotations

import zmq
from zmq.auth.thread import ThreadAuthenticator

KeyPair = tuple[bytes, bytes]  # (public, secret), z85


def new_keys() -> KeyPair:
    return zmq.curve_keypair()


class _OnlyTheDaemon:
    def __init__(self, key: bytes) -> None:
        self._key = key

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self._key


class AgentSocket:
    """The agent's end: bound on a free port of `host`. `close()` it (its ZAP handler's
    thread, too) before its context is terminated."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], host: str, daemon_key: str) -> None:
        self.public, secret = new_keys()
        self._authenticator = ThreadAuthenticator(ctx)
        self._authenticator.start()
        self._authenticator.configure_curve_callback(domain="*", credentials_provider=_OnlyTheDaemon(daemon_key.encode()))
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.curve_secretkey, self.socket.curve_publickey, self.socket.curve_server = secret, self.public, True
        self.endpoint = f"tcp://{host}:{self.socket.bind_to_random_port(f'tcp://{host}')}"

    def close(self) -> None:
        self.socket.close(linger=0)
        self._authenticator.stop()


def daemon_socket(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, agent_key: str, keys: KeyPair) -> zmq.Socket[bytes]:
    """The daemon's end of the link to the agent at `endpoint` (connecting: ZeroMQ
    reconnects by itself)."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.curve_serverkey = agent_key.encode()
    sock.curve_publickey, sock.curve_secretkey = keys
    sock.connect(endpoint)
    return sock
