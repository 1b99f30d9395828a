"""ZeroMQ endpoints: parsing, the default address, and the ipc socket's permissions.

An ipc socket is only as private as its directory: the daemon creates the directory
0700 (refusing one owned by someone else, closing one open to others) and the socket
0600, so only the daemon's user can connect; with group access, 0750 and 0660 let the
daemon's group in too.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path
from typing import Literal

import msgspec

ENDPOINT_ENV = "GENVISOR_ENDPOINT"
SOCKET_NAME = "genvisor.sock"
MAX_IPC_PATH_BYTES = 107  # sockaddr_un.sun_path is 108 bytes, the last a NUL (unix(7))


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
        if len(os.fsencode(address)) > MAX_IPC_PATH_BYTES:
            raise EndpointError(f"ipc endpoint {text!r}: the path is {len(os.fsencode(address))} bytes; "
                                f"a unix socket's path has at most {MAX_IPC_PATH_BYTES}")
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


def default_endpoint(runtime_dir: Path | None = None) -> Endpoint:
    """$GENVISOR_ENDPOINT, else the socket in `runtime_dir` (the daemon passes the one
    systemd made for it), else in `default_runtime_dir()`."""
    configured = os.environ.get(ENDPOINT_ENV)
    if configured:
        return parse_endpoint(configured)
    return Endpoint("ipc", str((runtime_dir or default_runtime_dir()) / SOCKET_NAME))


def prepare_private_dir(directory: Path, group_access: bool = False) -> None:
    """Create `directory` 0700 (0750 with group access), or check an existing one is
    ours and give it that mode."""
    mode = 0o750 if group_access else 0o700
    try:
        directory.mkdir(mode=mode, parents=True, exist_ok=True)
        info = directory.lstat()
    except OSError as exc:
        raise EndpointError(f"cannot make the socket's directory {directory}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise EndpointError(f"{directory} is not a directory")
    if info.st_uid != os.getuid():
        raise EndpointError(f"{directory} belongs to uid {info.st_uid}, not to this user; refusing to put the socket there")
    if stat.S_IMODE(info.st_mode) != mode:
        os.chmod(directory, mode)


def secure_ipc_socket(endpoint: Endpoint, group_access: bool = False) -> None:
    """After bind: the socket file is for its owner only (and its group, with group access)."""
    os.chmod(endpoint.path, 0o660 if group_access else 0o600)


SocketState = Literal["listening", "absent", "refused", "denied", "unknown"]


def probe_socket(path: str | Path) -> SocketState:
    """What is at the unix socket `path`, by a plain non-blocking connect: something
    `listening` (connected, or its backlog is full), `absent` (no such file), `refused`
    (a file nobody accepts on — a killed daemon leaves one), `denied` (not ours to
    connect to), or `unknown` (another error, left to whoever connects next)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC) as probe:
        try:
            probe.connect(str(path))
        except (FileNotFoundError, NotADirectoryError):
            return "absent"
        except ConnectionRefusedError:
            return "refused"
        except PermissionError:
            return "denied"
        except OSError as exc:
            return "listening" if exc.errno in (errno.EAGAIN, errno.EINPROGRESS) else "unknown"
    return "listening"
