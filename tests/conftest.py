"""Real daemons for the tests: each fixture starts `python -m genvisor serve` on an ipc
socket in a temp dir and stops it with SIGTERM, checking it exits 0 and leaves no
process behind."""

from __future__ import annotations

import itertools
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import atexit
import shutil
import tempfile

import psutil
import pytest

from genvisor.client import Client
from genvisor.errors import DaemonUnavailable

# No test may touch the home or the runtime dir of whoever runs the suite (a real
# daemon's journal, its socket): for the whole session, and for every daemon a test
# starts (they inherit the environment), the defaults that point there point into a
# temp dir instead.
SESSION_HOME = Path(tempfile.mkdtemp(prefix="genvisor-test-home-"))
atexit.register(shutil.rmtree, SESSION_HOME, ignore_errors=True)
os.environ.update(
    HOME=str(SESSION_HOME),
    XDG_STATE_HOME=str(SESSION_HOME / ".local" / "state"),
    XDG_RUNTIME_DIR=str(SESSION_HOME / "run"),
)
for _variable in ("GENVISOR_ENDPOINT", "STATE_DIRECTORY", "RUNTIME_DIRECTORY"):
    os.environ.pop(_variable, None)

# Small graces keep the escalation tests quick; the defaults are seconds.
TEST_CONFIG = """
[workers]
spares = 1
cancel_grace_ms = 300
term_grace_ms = 300
deadline_grace_ms = 200
"""

_names = itertools.count(1)

OPENAI_KEY_ENV = "GENVISOR_TEST_OPENAI_KEY"


def openai_config(base_url: str, timeout_ms: int = 5_000) -> str:
    """TEST_CONFIG with an `openai` backend named `local` at `base_url` (a FakeOpenAI);
    its key comes from $GENVISOR_TEST_OPENAI_KEY."""
    return TEST_CONFIG + f"""
[backends.local]
kind = "openai"
base_url = "{base_url}"
api_key_env = "{OPENAI_KEY_ENV}"
model = "test-model"
timeout_ms = {timeout_ms}
"""


def wait_for_exit(pids: list[int], timeout_s: float) -> list[int]:
    """Wait on pidfds until every pid has exited; returns those still alive at the
    deadline (psutil.wait_procs polls, and takes seconds for processes not our children)."""
    deadline = time.monotonic() + timeout_s
    alive = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            if not poller.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                alive.append(pid)
        finally:
            os.close(fd)
    return alive


def wait_for_group_gone(pgid: int, timeout_s: float) -> None:
    """Wait until no living process is left in process group `pgid`, on pidfds."""
    deadline = time.monotonic() + timeout_s
    while members := group_members(pgid):
        for pid in members:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                remaining_ms = max(0, int((deadline - time.monotonic()) * 1000))
                poller = select.poll()
                poller.register(fd, select.POLLIN)
                if not poller.poll(remaining_ms):
                    raise AssertionError(f"process {pid} of group {pgid} still alive after {timeout_s}s")
            finally:
                os.close(fd)


def spawn_marker(tmp_path: Path, name: str) -> tuple[list[str], Path, str]:
    """An argv for the scripted `spawn` option that announces itself on a FIFO and then
    sleeps under a unique name; returns (argv, fifo, name to find it by)."""
    fifo = tmp_path / f"{name}.fifo"
    os.mkfifo(fifo)
    tag = f"{100000 + next(_names)}"
    return ["sh", "-c", f"echo up > {fifo}; exec sleep {tag}"], fifo, tag


def wait_for_marker(fifo: Path, timeout_s: float = 10.0) -> None:
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        assert poller.poll(int(timeout_s * 1000)), f"nothing wrote to {fifo} within {timeout_s}s"
    finally:
        os.close(fd)


class Daemon:
    def __init__(self, directory: Path, config: str = TEST_CONFIG, env: dict[str, str] | None = None) -> None:
        self.env = {**os.environ, **(env or {})}
        self.directory = directory
        self.endpoint = f"ipc://{directory}/run/genvisor.sock"
        self.config_path = directory / "genvisor.toml"
        self.config_path.write_text(config)
        self.log_path = directory / "daemon.log"
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [sys.executable, "-m", "genvisor", "serve", "--endpoint", self.endpoint, "--config", str(self.config_path),
                "--state-dir", str(self.directory / "state")]

    def launch(self) -> None:
        """Start the process, without waiting for it to answer."""
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=log, env=self.env)

    def start(self) -> Daemon:
        self.launch()
        # A ping fails at once until the daemon's socket exists, then waits up to 250 ms.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited at start:\n{self.log()}")
            with self.client(timeout_ms=250) as client:
                try:
                    client.ping()
                    return self
                except DaemonUnavailable:
                    pass
            try:  # no socket yet, so that failed at once: look again shortly, or now if it exits
                self.process.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                pass
        raise AssertionError(f"daemon did not answer within 30s:\n{self.log()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def client(self, timeout_ms: int = 10_000) -> Client:
        return Client(self.endpoint, timeout_ms=timeout_ms)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            family = self.descendants()
            self.process.send_signal(signal.SIGTERM)
            code = self.process.wait(timeout=60)
            gone, alive = psutil.wait_procs(family, timeout=5)
            assert not alive, f"processes outlived the daemon: {alive}"
            return code
        return self.process.returncode


@pytest.fixture
def daemon(tmp_path):
    d = Daemon(tmp_path).start()
    yield d
    code = d.stop()
    assert code == 0, f"daemon exited {code}:\n{d.log()}"


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("daemon")).start()
    yield d
    code = d.stop()
    assert code == 0, f"daemon exited {code}:\n{d.log()}"


@pytest.fixture(scope="module", params=["in_process", "worker_process"])
def connect(request, tmp_path_factory):
    """A client factory for each executor: the embedded runtime (runs in-process) and a
    real daemon (a fresh worker process per run). Tests using it run on both."""
    if request.param == "in_process":
        from genvisor.daemon.config import load_config
        from genvisor.daemon.embedded import EmbeddedRuntime

        directory = tmp_path_factory.mktemp("embedded")
        path = directory / "genvisor.toml"
        path.write_text(TEST_CONFIG)
        runtime = EmbeddedRuntime(load_config(path, state_dir=str(directory / "state"))).__enter__()
        request.addfinalizer(runtime.close)
        return runtime.client
    return request.getfixturevalue("shared_daemon").client


@pytest.fixture
def conv():
    """A fresh conversation id per test."""
    return f"c{os.getpid()}_{next(_names)}"


def group_members(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    return members


def worker_of(tag: str, timeout_s: float = 10.0) -> int:
    """The worker of the run that started the process tagged `tag`: the leader of its
    session (each worker is its own session; a tool's command has a group of its own
    in it)."""
    deadline = time.monotonic() + timeout_s
    while (proc := find_tagged(tag)) is None:
        assert time.monotonic() < deadline, f"no process tagged {tag}"
    return os.getsid(proc.pid)


def find_tagged(tag: str) -> psutil.Process | None:
    """The process whose command line carries `tag` (a `spawn` argv marks a run): as
    `sh -c "…; exec sleep TAG"` until the exec, as `sleep TAG` after — the same pid."""
    for proc in psutil.process_iter(["cmdline"]):
        if tag in " ".join(proc.info["cmdline"] or []).split():
            return proc
    return None
