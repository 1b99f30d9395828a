"""genvisor as a systemd service: sd_notify from a real daemon (READY once serving,
WATCHDOG pings, STOPPING), the directories systemd hands the service, and the unit
checked by systemd's own tools and against what the daemon really does."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import psutil
import pytest
import trio

from conftest import TEST_CONFIG, Daemon
from genvisor.daemon.config import Config, load_config
from genvisor.daemon.sd_notify import Notifier
from genvisor.daemon.server import resolve_endpoint
from genvisor.errors import GenerationCanceled
from genvisor.ipc.endpoint import default_endpoint, prepare_private_dir

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNIT_EXEC = "ExecStart=/opt/genvisor/bin/genvisor "
# systemd 252 scores the unit 1.2; newer versions weigh a few settings differently.
MAX_EXPOSURE = 1.5

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")


class ServiceDaemon(Daemon):
    """The daemon as genvisor.service starts it: `serve --config` and nothing else, in
    the environment systemd makes (its runtime and state directories, a notify socket)."""

    def __init__(self, directory: Path, env: dict[str, str] | None = None, config: str = TEST_CONFIG,
                 prefix: Sequence[str] = ()) -> None:
        # GENVISOR_ENDPOINT emptied: a developer's own would win over the runtime directory.
        systemd_env = {"RUNTIME_DIRECTORY": str(directory / "run"), "STATE_DIRECTORY": str(directory / "state"),
                       "GENVISOR_ENDPOINT": ""}
        super().__init__(directory, config, env={**systemd_env, **(env or {})})
        self.prefix = list(prefix)  # e.g. a tracer; it must exec the daemon or be its parent

    def command(self) -> list[str]:
        return [*self.prefix, sys.executable, "-m", "genvisor", "serve", "--config", str(self.config_path)]


class NotifyListener:
    """The service manager's end of sd_notify: a datagram socket the daemon reports to."""

    def __init__(self, address: str) -> None:
        self.address = address  # as NOTIFY_SOCKET spells it
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.received: list[list[str]] = []

    def expect(self, field: str, process: subprocess.Popen, timeout_s: float = 30) -> list[str]:
        """Read datagrams until one carries `field`; fail if `process` exits first."""
        deadline = time.monotonic() + timeout_s
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(min(remaining, 0.5))  # wakes up to notice a dead daemon
            try:
                fields = self.sock.recv(4096).decode().split("\n")
            except TimeoutError:
                if process.poll() is not None:
                    raise AssertionError(f"the daemon exited {process.returncode} before {field}; got {self.received}") from None
                continue
            self.received.append(fields)
            if field in fields:
                return fields
        raise AssertionError(f"no {field} within {timeout_s}s; got {self.received}")


@pytest.fixture(params=["path", "abstract"])
def notify_listener(request, tmp_path):
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
    else:
        address = f"@genvisor-test-{uuid.uuid4().hex}"
    listener = NotifyListener(address)
    yield listener
    listener.sock.close()


# ---- a real daemon under a service manager -----------------------------------------


def test_ready_once_serving_then_watchdog_pings_then_stopping(notify_listener, tmp_path):
    d = ServiceDaemon(tmp_path, env={"NOTIFY_SOCKET": notify_listener.address, "WATCHDOG_USEC": "200000"})
    d.launch()
    try:
        ready = notify_listener.expect("READY=1", d.process)
        # READY means serving: the socket is bound where systemd's runtime directory says.
        socket_path = tmp_path / "run" / "genvisor.sock"
        assert stat.S_ISSOCK(socket_path.stat().st_mode)
        with d.client(timeout_ms=5000) as client:
            info = client.ping()
        assert (info.pid, info.endpoint) == (d.pid, f"ipc://{socket_path}")
        assert f"STATUS=serving on ipc://{socket_path}" in ready

        for _ in range(3):
            notify_listener.expect("WATCHDOG=1", d.process, timeout_s=5)
        for child in d.descendants():  # the zygote and its spare workers
            assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC"} & child.environ().keys()

        family = d.descendants()
        d.process.send_signal(signal.SIGTERM)
        notify_listener.expect("STOPPING=1", d.process)
        assert d.process.wait(timeout=60) == 0, d.log()
        gone, alive = psutil.wait_procs(family, timeout=5)
        assert not alive
    finally:
        d.stop()
    assert sum("READY=1" in fields for fields in notify_listener.received) == 1


# ---- the notifier on its own ---------------------------------------------------------


async def test_without_a_notify_socket_every_call_is_a_no_op():
    notifier = Notifier.from_environ({}, pid=os.getpid())
    assert notifier == Notifier()
    assert not notifier.ready("serving") and not notifier.stopping("stopping")
    await notifier.keep_watchdog()  # returns at once: nobody to ping


def test_a_watchdog_for_another_pid_is_not_ours():
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "10000000"}
    assert Notifier.from_environ({**env, "WATCHDOG_PID": "1"}, pid=4242).watchdog_usec is None
    assert Notifier.from_environ({**env, "WATCHDOG_PID": "4242"}, pid=4242).watchdog_usec == 10_000_000
    assert Notifier.from_environ(dict(env), pid=4242).watchdog_usec == 10_000_000


@pytest.mark.parametrize("usec", ["", "0", "-5", "ten"])
def test_a_bad_watchdog_interval_disables_the_watchdog(usec):
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@n", "WATCHDOG_USEC": usec}, pid=1)
    assert notifier == Notifier(address="@n")


def test_reading_the_environment_removes_it_so_children_do_not_inherit_it():
    env = {"NOTIFY_SOCKET": "@n", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "7", "PATH": "/bin"}
    Notifier.from_environ(env, pid=7)
    assert env == {"PATH": "/bin"}


def test_a_notify_socket_that_is_neither_a_path_nor_abstract_is_ignored():
    assert Notifier.from_environ({"NOTIFY_SOCKET": "run/notify"}, pid=1) == Notifier()


def test_a_vanished_notify_socket_is_not_fatal(tmp_path):
    assert Notifier(address=str(tmp_path / "gone.sock")).ready("serving") is False


def test_a_full_notify_socket_drops_the_message_instead_of_blocking(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:  # never reads
        manager.bind(str(tmp_path / "notify.sock"))
        notifier = Notifier(address=str(tmp_path / "notify.sock"))
        sent = [notifier.notify("WATCHDOG=1") for _ in range(1000)]
    assert sent[0] and not sent[-1]


async def test_the_watchdog_pings_at_half_the_interval(tmp_path, autojump_clock):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(str(tmp_path / "notify.sock"))
        manager.setblocking(False)
        notifier = Notifier(address=str(tmp_path / "notify.sock"), watchdog_usec=200_000)
        with trio.move_on_after(0.45):
            await notifier.keep_watchdog()
        pings = []
        while True:
            try:
                pings.append(manager.recv(64))
            except BlockingIOError:
                break
    assert pings == [b"WATCHDOG=1"] * 5  # at 0, 0.1, 0.2, 0.3 and 0.4 s


# ---- the directories systemd makes ---------------------------------------------------


def test_systemds_directories_are_the_daemons_defaults(monkeypatch):
    monkeypatch.delenv("GENVISOR_ENDPOINT", raising=False)
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/genvisor:/run/other")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/genvisor")
    assert str(resolve_endpoint(Config())) == "ipc:///run/genvisor/genvisor.sock"
    assert Config().state_path() == Path("/var/lib/genvisor")
    # The config says otherwise, or GENVISOR_ENDPOINT does: they win.
    assert str(resolve_endpoint(Config(endpoint="tcp://127.0.0.1:5555"))) == "tcp://127.0.0.1:5555"
    assert Config(state_dir="/srv/genvisor").state_path() == Path("/srv/genvisor")
    monkeypatch.setenv("GENVISOR_ENDPOINT", "ipc:///srv/genvisor.sock")
    assert str(resolve_endpoint(Config())) == "ipc:///srv/genvisor.sock"


def test_a_client_does_not_look_in_its_own_services_runtime_directory(monkeypatch):
    monkeypatch.delenv("GENVISOR_ENDPOINT", raising=False)
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/some-other-service")
    assert "some-other-service" not in str(default_endpoint())


def test_group_access_opens_the_socket_to_the_daemons_group(tmp_path):
    d = Daemon(tmp_path, "ipc_group_access = true\n" + TEST_CONFIG).start()
    try:
        path = Path(d.endpoint.removeprefix("ipc://"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
        assert path.stat().st_gid == os.getegid()
    finally:
        assert d.stop() == 0


def test_the_socket_directory_gets_exactly_the_mode_asked_for(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir(mode=0o755)
    prepare_private_dir(directory, group_access=True)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o750
    prepare_private_dir(directory)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


# ---- the unit, checked by systemd's tools --------------------------------------------


@pytest.fixture
def unit(tmp_path) -> Path:
    """The unit with ExecStart on this environment's `genvisor` (verify wants it to exist)."""
    genvisor = Path(sys.executable).parent / "genvisor"
    assert genvisor.exists(), "the genvisor script is not installed next to this python"
    text = (SYSTEMD_DIR / "genvisor.service").read_text()
    assert UNIT_EXEC in text
    path = tmp_path / "genvisor.service"
    path.write_text(text.replace(UNIT_EXEC, f"ExecStart={genvisor} "))
    return path


@needs_systemd_analyze
def test_the_unit_passes_systemd_analyze_verify(unit):
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, cwd=unit.parent, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not [line for line in output.splitlines() if unit.name in line], output


@needs_systemd_analyze
def test_the_units_exposure_is_low(unit):
    version = subprocess.run(["systemd-analyze", "--version"], capture_output=True, text=True).stdout
    if int(re.match(r"systemd (\d+)", version).group(1)) < 250:
        pytest.skip("systemd-analyze security --offline needs systemd 250 or newer")
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(unit)],
                            capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for genvisor\.service: (\d+\.\d+)", result.stdout)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE, result.stdout


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd-sysusers is not installed")
def test_sysusers_creates_the_units_user_with_its_state_directory_as_home(tmp_path):
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(SYSTEMD_DIR / "genvisor.sysusers.conf")],
                   check=True, capture_output=True, timeout=60)
    name, _, uid, gid, _, home, shell = next(
        line for line in (tmp_path / "etc" / "passwd").read_text().splitlines() if line.startswith("genvisor:")
    ).split(":")
    unit = (SYSTEMD_DIR / "genvisor.service").read_text()
    assert f"User={name}" in unit and "StateDirectory=genvisor" in unit
    assert home == "/var/lib/genvisor" and shell.endswith("nologin")
    assert f"genvisor:x:{gid}:" in (tmp_path / "etc" / "group").read_text()


def test_the_example_config_loads_and_leaves_the_directories_to_systemd():
    config = load_config(SYSTEMD_DIR / "genvisor.toml")
    assert (config.endpoint, config.state_dir) == (None, None)
    assert "--config /etc/genvisor/genvisor.toml" in (SYSTEMD_DIR / "genvisor.service").read_text()


# ---- the unit's sandbox, against what the daemon really does -------------------------

_PR_SET_MDWE, _PR_GET_MDWE, _PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1
# Turn on the kernel's write-xor-execute for this process and exec the daemon; the
# setting survives exec and fork, so it covers the zygote and every worker too.
_MDWE_EXEC = (
    "import ctypes, os, sys\n"
    f"assert ctypes.CDLL(None).prctl({_PR_SET_MDWE}, {_PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def _has_mdwe() -> bool:
    return ctypes.CDLL(None).prctl(_PR_GET_MDWE, 0, 0, 0, 0) >= 0


@pytest.mark.skipif(not _has_mdwe(), reason="PR_SET_MDWE needs Linux 6.3 or newer")
def test_the_daemon_runs_without_writable_executable_memory(tmp_path):
    """MemoryDenyWriteExecute=yes: daemon, zygote (with the openai SDK preloaded) and a
    worker serve a generation with W+X mappings refused by the kernel."""
    config = TEST_CONFIG + '\n[backends.local]\nkind = "openai"\nbase_url = "http://127.0.0.1:9/v1"\nmodel = "m"\n'
    d = ServiceDaemon(tmp_path, config=config, prefix=[sys.executable, "-c", _MDWE_EXEC]).start()
    try:
        with d.client() as client:
            _, result = client.send_and_generate("c1", "hello")
        assert result.text == "hello"
    finally:
        assert d.stop() == 0, d.log()


def _syscall_groups() -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    listing = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True, check=True).stdout
    for line in listing.splitlines():
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if line.startswith("@"):
            members = groups.setdefault(name, [])
        else:
            members.append(name)
    return groups


def _unit_syscall_filter(unit_text: str) -> set[str]:
    """The calls the unit's SystemCallFilter= lines allow: the first lists, `~` lines take away."""
    groups = _syscall_groups()

    def expand(name: str) -> set[str]:
        return set().union(*map(expand, groups[name])) if name.startswith("@") else {name}

    allowed: set[str] = set()
    for value in re.findall(r"^SystemCallFilter=(.*)$", unit_text, re.M):
        names = set().union(*map(expand, value.lstrip("~").split()))
        allowed = allowed - names if value.startswith("~") else allowed | names
    return allowed


def _can_strace() -> bool:
    return shutil.which("strace") is not None and subprocess.run(
        ["strace", "-qq", "-o", os.devnull, "true"], capture_output=True
    ).returncode == 0


@needs_systemd_analyze
@pytest.mark.skipif(not _can_strace(), reason="strace is missing or may not trace here")
def test_every_system_call_the_daemon_makes_passes_the_units_filter(tmp_path):
    """SystemCallFilter= refuses anything else with EPERM: trace a daemon through start,
    generations, a tool command, a cancel and a shutdown with a run in flight."""
    trace = tmp_path / "trace"
    d = ServiceDaemon(tmp_path, prefix=["strace", "-f", "-qq", "-o", str(trace)]).start()
    daemon = psutil.Process(d.pid).children()[0]  # strace's child
    try:
        with d.client() as client:
            client.send_and_generate("c1", "hello")
            client.configure_skills("c2", ["run_command"])
            command = {"name": "run_command", "arguments": {"argv": ["sh", "-c", "echo hi"]}}
            client.send_and_generate("c2", "run it", generation_opts={
                "backend_opts": {"script": [{"tool_calls": [command]}, {"text": "done"}]}})
            client.send_user_message("c3", "wait")
            ref = client.generate_assistant_reply("c3", backend_opts={"delay_ms": 60_000})
            client.cancel_generation("c3")
            with pytest.raises(GenerationCanceled):
                client.await_generation("c3", ref)
            client.send_user_message("c4", "wait")
            client.generate_assistant_reply("c4", backend_opts={"delay_ms": 60_000})
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert d.process.wait(timeout=60) == 0, d.log()
    used = set(re.findall(r"^\d+\s+([a-z0-9_]+)\(", trace.read_text(), re.M))
    assert "prctl" in used and "setsid" in used  # the trace saw the supervisor at work
    if os.geteuid() == 0:
        # SQLite hands the WAL files it creates to the database's owner only when it
        # runs as root (and ignores a refusal); the unit runs as User=genvisor.
        used.discard("fchown")
    assert used - _unit_syscall_filter((SYSTEMD_DIR / "genvisor.service").read_text()) == set()
