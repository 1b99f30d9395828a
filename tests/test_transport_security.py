"""Transport security: tcp only with CURVE, key files checked at start-up, only
authorized client keys get through, and the ipc socket is private."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from conftest import TEST_CONFIG, Daemon
from genvisor.client import Client
from genvisor.errors import DaemonUnavailable, NotFound
from genvisor.ipc import codec, frames
from genvisor.ipc.curve import CurveError, load_key_pair, server_curve, write_certificate_pair
from genvisor.ipc.endpoint import parse_endpoint
from raw_peer import RawPeer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def security_config(keys: Path, secret: str = "server.key_secret", authorized: str = "authorized") -> str:
    return TEST_CONFIG + f"""
[security]
server_secret_key_file = "{keys / secret}"
authorized_clients_dir = "{keys / authorized}"
"""


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """server, alice (authorized) and mallory (not) key pairs; alice.key in authorized/."""
    directory = tmp_path_factory.mktemp("keys")
    for name in ("server", "alice", "mallory"):
        write_certificate_pair(directory, name)
    (directory / "authorized").mkdir(mode=0o700)
    shutil.copy(directory / "alice.key", directory / "authorized" / "alice.key")
    return directory


class CurveDaemon(Daemon):
    """A daemon on loopback tcp with CURVE; its clients are alice unless told otherwise."""

    def __init__(self, directory: Path, keys: Path) -> None:
        super().__init__(directory, security_config(keys))
        self.keys = keys
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"

    def client(self, timeout_ms: int = 10_000, name: str = "alice") -> Client:
        return Client(self.endpoint, timeout_ms=timeout_ms, server_key=self.keys / "server.key",
                      client_key=self.keys / f"{name}.key_secret")


@pytest.fixture(scope="module")
def curve_daemon(keys, tmp_path_factory):
    d = CurveDaemon(tmp_path_factory.mktemp("curve"), keys).start()
    yield d
    assert d.stop() == 0, d.log()


def serve(tmp_path: Path, endpoint: str, config: str) -> subprocess.CompletedProcess:
    (tmp_path / "genvisor.toml").write_text(config)
    return subprocess.run(
        [sys.executable, "-m", "genvisor", "serve", "--endpoint", endpoint, "--config", str(tmp_path / "genvisor.toml"),
         "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, timeout=60,
    )


# ---- refused at start-up ----------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_tcp_without_curve_is_refused_at_start_with_exit_2(tmp_path, host):
    done = serve(tmp_path, f"tcp://{host}:{free_port()}", TEST_CONFIG)
    assert done.returncode == 2, done.stderr
    assert "without CURVE" in done.stderr and "Traceback" not in done.stderr


def test_a_missing_key_file_is_refused_at_start_with_exit_2(tmp_path, keys):
    done = serve(tmp_path, f"tcp://127.0.0.1:{free_port()}", security_config(keys, secret="nowhere.key_secret"))
    assert done.returncode == 2
    assert "server_secret_key_file" in done.stderr and "no such file" in done.stderr and "Traceback" not in done.stderr


def test_half_a_security_table_is_refused_at_start_with_exit_2(tmp_path, keys):
    config = TEST_CONFIG + f'[security]\nserver_secret_key_file = "{keys / "server.key_secret"}"\n'
    done = serve(tmp_path, f"tcp://127.0.0.1:{free_port()}", config)
    assert done.returncode == 2 and "go together" in done.stderr


def _bad_material(keys: Path, tmp_path: Path, case: str) -> tuple[Path, Path]:
    secret, authorized = tmp_path / "server.key_secret", tmp_path / "authorized"
    shutil.copy(keys / "server.key_secret", secret)
    shutil.copytree(keys / "authorized", authorized)
    if case == "garbage_secret":
        secret.write_text("this is not a certificate\n")
    elif case == "public_as_secret":
        shutil.copy(keys / "server.key", secret)
    elif case == "short_key":
        secret.write_text('curve\n    public-key = "abc"\n    secret-key = "def"\n')
    elif case == "mismatched_pair":
        alice = (keys / "alice.key_secret").read_text().splitlines()
        mixed = [line for line in secret.read_text().splitlines() if "secret-key" not in line]
        secret.write_text("\n".join(mixed + [line for line in alice if "secret-key" in line]) + "\n")
    elif case == "secret_open_to_others":
        secret.chmod(0o644)
    elif case == "no_authorized_dir":
        shutil.rmtree(authorized)
    elif case == "empty_authorized_dir":
        (authorized / "alice.key").unlink()
    elif case == "garbage_authorized_key":
        (authorized / "eve.key").write_text("nonsense\n")
    elif case == "authorized_dir_writable_by_others":
        authorized.chmod(0o777)
    return secret, authorized


BAD_MATERIAL = {
    "garbage_secret": "not a ZeroMQ certificate",
    "public_as_secret": "holds no secret key",
    "short_key": "not a 40-character Z85",
    "mismatched_pair": "do not belong together",
    "secret_open_to_others": "chmod 600",
    "no_authorized_dir": "no such directory",
    "empty_authorized_dir": "no client could connect",
    "garbage_authorized_key": "eve.key is not a ZeroMQ certificate",
    "authorized_dir_writable_by_others": "chmod go-w",
}


@pytest.mark.parametrize("case", list(BAD_MATERIAL))
def test_bad_key_material_is_refused_with_what_to_fix(keys, tmp_path, case):
    secret, authorized = _bad_material(keys, tmp_path, case)
    with pytest.raises(CurveError, match=BAD_MATERIAL[case]):
        server_curve(parse_endpoint("tcp://127.0.0.1:1"), str(secret), str(authorized))


# ---- over tcp with CURVE -----------------------------------------------------------------


def test_an_authorized_client_runs_a_turn_over_tcp(curve_daemon):
    with curve_daemon.client() as client:
        assert client.ping().endpoint == curve_daemon.endpoint
        _, result = client.send_and_generate("over-tcp", "hello")
        assert result.text == "hello"


def test_a_client_whose_key_is_not_authorized_is_refused_at_once_and_changes_nothing(curve_daemon):
    started = time.monotonic()
    with curve_daemon.client(timeout_ms=10_000, name="mallory") as client:
        with pytest.raises(DaemonUnavailable, match="authorized_clients_dir"):
            client.start_conversation("mallory-was-here")
    assert time.monotonic() - started < 5  # named at the handshake, not at the timeout
    with curve_daemon.client() as client, pytest.raises(NotFound):
        client.conversation("mallory-was-here")


def test_a_plaintext_peer_gets_nothing_through(curve_daemon):
    frame = codec.encode_request(1, frames.StartConversation("plaintext-was-here"))
    with RawPeer(curve_daemon.endpoint, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL) as peer:
        peer.send(frame)
        event = peer.wait_for_event(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        assert event["value"] == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
        assert not peer.socket.poll(0)
    with Client(curve_daemon.endpoint, timeout_ms=10_000) as plain, pytest.raises(DaemonUnavailable, match="requires CURVE"):
        plain.start_conversation("plaintext-was-here")
    with curve_daemon.client() as client, pytest.raises(NotFound):
        client.conversation("plaintext-was-here")


def test_a_client_with_the_wrong_server_key_is_refused(curve_daemon, keys):
    with Client(curve_daemon.endpoint, server_key=keys / "mallory.key", client_key=keys / "alice.key_secret") as client:
        with pytest.raises(DaemonUnavailable, match="CURVE handshake"):
            client.ping()


def test_the_cli_takes_keys_from_flags_or_the_environment(curve_daemon, keys):
    base = [sys.executable, "-m", "genvisor"]
    flags = ["--endpoint", curve_daemon.endpoint, "--server-key", str(keys / "server.key"), "--client-key", str(keys / "alice.key_secret")]
    done = subprocess.run([*base, *flags, "ping"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "GENVISOR_ENDPOINT": curve_daemon.endpoint, "GENVISOR_SERVER_KEY": str(keys / "server.key"),
           "GENVISOR_CLIENT_KEY": str(keys / "alice.key_secret")}
    done = subprocess.run([*base, "ping"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    env["GENVISOR_CLIENT_KEY"] = str(keys / "mallory.key_secret")
    done = subprocess.run([*base, "ping"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 3 and "authorized_clients_dir" in done.stderr
    env["GENVISOR_CLIENT_KEY"] = str(keys / "alice.key")  # the public half: no secret in it
    done = subprocess.run([*base, "ping"], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2 and "holds no secret key" in done.stderr


# ---- client key files and keygen ---------------------------------------------------------


def test_a_client_needs_both_keys_and_a_private_secret(keys, tmp_path):
    with pytest.raises(CurveError, match="both"):
        Client("tcp://127.0.0.1:1", server_key=keys / "server.key")
    open_secret = tmp_path / "open.key_secret"
    shutil.copy(keys / "alice.key_secret", open_secret)
    open_secret.chmod(0o640)
    with pytest.raises(CurveError, match="chmod 600"):
        Client("tcp://127.0.0.1:1", server_key=keys / "server.key", client_key=open_secret)


def test_keygen_writes_a_private_pair_and_never_overwrites(tmp_path):
    directory = tmp_path / "new" / "keys"
    done = subprocess.run([sys.executable, "-m", "genvisor", "keygen", str(directory), "ops"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    public, secret = directory / "ops.key", directory / "ops.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert load_key_pair(secret, "test").public in public.read_bytes()
    assert sorted(p.name for p in directory.iterdir()) == ["ops.key", "ops.key_secret"]
    before = secret.read_bytes()
    done = subprocess.run([sys.executable, "-m", "genvisor", "keygen", str(directory), "ops"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "refusing to overwrite" in done.stderr
    assert secret.read_bytes() == before


# ---- ipc -------------------------------------------------------------------------------


def test_the_ipc_socket_is_0600_in_a_0700_directory_even_one_that_was_open(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o755)  # an existing directory open to others gets closed
    daemon = Daemon(tmp_path).start()
    try:
        path = Path(daemon.endpoint.removeprefix("ipc://"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    finally:
        assert daemon.stop() == 0, daemon.log()
