"""CURVE for the daemon's socket: key files, the server's ZAP handler, socket options.

A tcp endpoint is reachable from the network, so the daemon listens on one only with
CURVE (ZeroMQ's CurveZMQ: Curve25519 keys, every connection encrypted to the server's
key). The server proves itself with its secret key; a client gets through only if its
public key sits in the operator's `authorized_clients_dir`. The check is pyzmq's ZAP
handler (`ThreadAuthenticator`), in its own thread, so it never touches the Trio loop.
Without a ZAP handler libzmq would let any client with any key in: it is not optional.

Keys live in ZeroMQ certificate files, the format of `zmq.auth` (and czmq):
`genvisor keygen DIR NAME` writes NAME.key (the public key, to hand out) and
NAME.key_secret (both keys, mode 0600). Like ssh, a secret key file that others can
read, or an authorized directory others can write to, is refused.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from pathlib import Path

import msgspec
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from genvisor.ipc.endpoint import Endpoint

SERVER_KEY_ENV = "GENVISOR_SERVER_KEY"  # the daemon's public certificate, for clients
CLIENT_KEY_ENV = "GENVISOR_CLIENT_KEY"  # this client's secret certificate

log = logging.getLogger("genvisor.curve")


class CurveError(ValueError):
    """A key file or directory is missing, unreadable, malformed or too open."""


class KeyPair(msgspec.Struct, frozen=True):
    public: bytes  # Z85, 40 characters (32 bytes)
    secret: bytes


class ServerCurve(msgspec.Struct, frozen=True):
    keys: KeyPair
    authorized_dir: str  # client public certificates (*.key), read once at start
    authorized: int  # how many


class ClientCurve(msgspec.Struct, frozen=True):
    server_public: bytes
    keys: KeyPair


# ---- key files ------------------------------------------------------------------------


def _read_certificate(path: Path, what: str) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise CurveError(f"{what} {path}: no such file")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise CurveError(f"{what} {path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError:
        raise CurveError(f"{what} {path} is not a ZeroMQ certificate (no public-key line; `genvisor keygen` writes one)") from None
    _check_key(public, path, what, "public")
    if secret is not None:
        _check_key(secret, path, what, "secret")
    return public, secret


def _check_key(key: bytes, path: Path, what: str, kind: str) -> None:
    try:
        valid = len(key) == 40 and len(z85.decode(key)) == 32
    except (KeyError, ValueError):  # a character outside the Z85 alphabet
        valid = False
    if not valid:
        raise CurveError(f"{what} {path}: its {kind} key is not a 40-character Z85 CURVE key")


def load_public_key(path: str | os.PathLike[str], what: str) -> bytes:
    return _read_certificate(Path(path), what)[0]


def load_key_pair(path: str | os.PathLike[str], what: str) -> KeyPair:
    """A secret certificate: both keys, belonging together, readable by its owner only."""
    path = Path(path)
    public, secret = _read_certificate(path, what)
    if secret is None:
        raise CurveError(f"{what} {path} holds no secret key (a public certificate? use the .key_secret file)")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise CurveError(f"{what} {path} is open to other users (mode {mode:04o}); a secret key must be 0600: chmod 600 {path}")
    if zmq.curve_public(secret) != public:
        raise CurveError(f"{what} {path}: its public and secret keys do not belong together")
    return KeyPair(public, secret)


def count_authorized_keys(directory: str | os.PathLike[str]) -> int:
    """Check every client certificate in `directory` (pyzmq's loader would skip a bad
    one silently) and return how many there are."""
    directory = Path(directory)
    what = "security.authorized_clients_dir"
    if not directory.is_dir():
        raise CurveError(f"{what} {directory}: no such directory")
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o022:
        raise CurveError(f"{what} {directory} is writable by other users (mode {mode:04o}): whoever can add a key there can let "
                         f"themselves in; chmod go-w {directory}")
    files = sorted(directory.glob("*.key"))
    for path in files:
        _read_certificate(path, "authorized client certificate")
    if not files:
        raise CurveError(f"{what} {directory} holds no client public keys (*.key), so no client could connect; "
                         "`genvisor keygen DIR NAME` writes NAME.key to copy there")
    return len(files)


def write_certificate_pair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (0600) into `directory`, created
    0700 if missing; never overwrite a key."""
    if not name or "/" in name or name.startswith("."):
        raise CurveError(f"key name {name!r} must be a plain file name")
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise CurveError(f"{path} exists; refusing to overwrite a key")
    # pyzmq writes with the process umask (often 0644): write in a private (0700)
    # directory and tighten the mode there, so the secret is never readable by others.
    with tempfile.TemporaryDirectory(dir=directory, prefix=".keygen-") as private:
        made_public, made_secret = zmq.auth.create_certificates(private, name)
        os.chmod(made_secret, 0o600)
        os.chmod(made_public, 0o644)
        os.replace(made_secret, secret)
        os.replace(made_public, public)
    return public, secret


# ---- the two ends ---------------------------------------------------------------------


def server_curve(endpoint: Endpoint, secret_key_file: str | None, authorized_dir: str | None) -> ServerCurve | None:
    """The daemon's CURVE setup, checked before it binds; None for ipc without it.

    tcp without CURVE is refused: an unauthenticated tcp socket lets anyone who can
    reach the port (other users of the machine included) drive generations, tools and
    commands as the daemon's user, and read every conversation."""
    if secret_key_file is None or authorized_dir is None:
        if endpoint.scheme == "tcp":
            raise CurveError(f"refusing to listen on {endpoint} without CURVE: set security.server_secret_key_file and "
                             "security.authorized_clients_dir in the config (see README, Security), or use an ipc:// endpoint")
        return None
    keys = load_key_pair(secret_key_file, "security.server_secret_key_file")
    return ServerCurve(keys, authorized_dir, count_authorized_keys(authorized_dir))


def client_curve(server_key: str | os.PathLike[str] | None = None, client_key: str | os.PathLike[str] | None = None) -> ClientCurve | None:
    """A client's CURVE keys: the arguments, else $GENVISOR_SERVER_KEY and
    $GENVISOR_CLIENT_KEY; None when neither names a file."""
    server_key = server_key or os.environ.get(SERVER_KEY_ENV) or None
    client_key = client_key or os.environ.get(CLIENT_KEY_ENV) or None
    if server_key is None and client_key is None:
        return None
    if server_key is None or client_key is None:
        raise CurveError(f"CURVE needs both the daemon's public key (--server-key or ${SERVER_KEY_ENV}) and this client's "
                         f"secret key (--client-key or ${CLIENT_KEY_ENV})")
    return ClientCurve(load_public_key(server_key, "server key"), load_key_pair(client_key, "client key"))


def secure_server_socket(ctx: zmq.Context[zmq.Socket[bytes]], sock: zmq.Socket[bytes], curve: ServerCurve) -> ThreadAuthenticator:
    """Make `sock` a CURVE server whose clients pyzmq's ZAP handler checks against the
    authorized directory. Call before bind; stop the returned handler before ctx.term()."""
    authenticator = ThreadAuthenticator(ctx, log=log)
    authenticator.start()
    # domain "*" is pyzmq's default domain, used when the socket sets no ZAP domain.
    authenticator.configure_curve(domain="*", location=curve.authorized_dir)
    sock.curve_secretkey = curve.keys.secret
    sock.curve_publickey = curve.keys.public
    sock.curve_server = True
    log.info("CURVE on: %d authorized client key(s) from %s", curve.authorized, curve.authorized_dir)
    return authenticator


def secure_client_socket(sock: zmq.Socket[bytes], curve: ClientCurve) -> None:
    """Make `sock` a CURVE client of the daemon whose public key is in `curve`. Call before connect."""
    sock.curve_serverkey = curve.server_public
    sock.curve_publickey = curve.keys.public
    sock.curve_secretkey = curve.keys.secret
