"""ZeroMQ endpoints: parsing, the default address, and the ipc socket's permissions.

An ipc socket is only as private as its directory: the daemon creates the directory
0700 (refusing one owned by someone else or open to others) and the socket 0600, so
only the daemon's user can connect.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import msgspec

ENDPOINT_ENV = "GENVISOR_ENDPOINT"
SOCKET_NAME = "genvisor.sock"


class EndpointError(ValueError):
    pass


class Endpoint(msgspec.Struct, frozen=True):
    scheme: str  # "ipc" | "tcp"
    address: str  # a path for ipc, "host:port" for tcp

    def __str__(self) -> str:
        return f"{self.scheme}://{self.address}"

    @property
    def path(self) -> Path:
        assert self.scheme == "ipc"
        return Path(self.address)


def parse_endpoint(text: str) -> Endpoint:
    scheme, sep, address = text.partition("://")
    if not sep or not address:
        raise EndpointError(f"endpoint {text!r} is not SCHEME://ADDRESS (ipc://PATH or tcp://HOST:PORT)")
    if scheme == "ipc":
        if not address.startswith("/"):
            raise EndpointError(f"ipc endpoint {text!r} needs an absolute path")
        return Endpoint("ipc", address)
    if scheme == "tcp":
        host, colon, port = address.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise EndpointError(f"tcp endpoint {text!r} needs HOST:PORT with a port in 1..65535")
        return Endpoint("tcp", address)
    raise EndpointError(f"endpoint scheme {scheme!r} is not supported (use ipc:// or tcp://)")


def default_runtime_dir() -> Path:
    """Where the daemon's socket lives unless configured: $XDG_RUNTIME_DIR/genvisor,
    else /tmp/genvisor-UID (a 0700 directory either way)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "genvisor"
    return Path(f"/tmp/genvisor-{os.getuid()}")


def default_endpoint() -> Endpoint:
    configured = os.environ.get(ENDPOINT_ENV)
    if configured:
        return parse_endpoint(configured)
    return Endpoint("ipc", str(default_runtime_dir() / SOCKET_NAME))


def prepare_private_dir(directory: Path) -> None:
    """Create `directory` 0700, or check an existing one is ours and closed to others."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise EndpointError(f"{directory} is not a directory")
    if info.st_uid != os.getuid():
        raise EndpointError(f"{directory} belongs to uid {info.st_uid}, not to this user; refusing to put the socket there")
    if info.st_mode & 0o077:
        os.chmod(directory, 0o700)


def secure_ipc_socket(endpoint: Endpoint) -> None:
    """After bind: make the socket file readable and writable by its owner only."""
    os.chmod(endpoint.path, 0o600)
