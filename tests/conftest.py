"""Real daemons for the tests: each fixture starts `python -m genvisor serve` on an ipc
socket in a temp dir and stops it with SIGTERM, checking it exits 0 and leaves no
process behind. The daemon process and the waits are the bench's too
(bench/daemon_process.py); every wait has a deadline and names what it waited for."""

from __future__ import annotations

import atexit
import functools
import itertools
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

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

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # bench/ is importable from the repo root, not installed

# The tests import the waits from here, with the helpers below.
from bench.daemon_process import DaemonProcess, WaitTimedOut, readable, wait_for_exit, wait_until  # noqa: E402, F401

# Small graces keep the escalation tests quick; the defaults are seconds. The tests
# written before approvals run commands unasked; tests/test_approvals.py has the
# default ("ask") back.
TEST_CONFIG = """
[workers]
spares = 1
cancel_grace_ms = 300
term_grace_ms = 300
deadline_grace_ms = 200

[approvals]
run_command = "allow"
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


def wait_for_group_gone(pgid: int, timeout_s: float) -> None:
    """Wait until no living process is left in process group `pgid`, on pidfds."""
    deadline = time.monotonic() + timeout_s
    while members := group_members(pgid):  # each pass waits on a pidfd: no busy loop
        if alive := wait_for_exit(members, deadline - time.monotonic()):
            raise WaitTimedOut(f"processes {alive} of group {pgid} still alive after {timeout_s:g} s")


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
        if not readable(fd, timeout_s):
            raise WaitTimedOut(f"nothing wrote to {fifo} within {timeout_s:g} s")
    finally:
        os.close(fd)


class Daemon(DaemonProcess):
    """The shared daemon process (bench.daemon_process), checked as a test wants it:
    a stop leaves no process of its behind."""

    def __init__(self, directory: Path, config: str = TEST_CONFIG, env: dict[str, str] | None = None) -> None:
        super().__init__(directory, config, env=env)

    def start(self) -> Daemon:
        super().start()
        return self

    def stop(self) -> int:
        assert self.process is not None
        family = [p.pid for p in self.descendants()] if self.process.poll() is None else []
        code = super().stop()
        alive = wait_for_exit(family, timeout_s=5)
        assert not alive, f"processes outlived the daemon: {alive}"
        return code


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


def ray_config(address: str, base: str = TEST_CONFIG, workspaces: str = "node") -> str:
    return base + f"""
[executor]
kind = "ray"
address = "{address}"
workspaces = "{workspaces}"
"""


class RayDaemon(Daemon):
    """A daemon whose runs go to a Ray cluster. Its runs' processes are not its
    descendants but the nodes' (under their raylets): they carry its state dir in their
    marker (supervisor.linux.INSTANCE_ENV), and a stop checks none is left."""

    def __init__(self, directory: Path, address: str, *, config: str = TEST_CONFIG, workspaces: str = "node") -> None:
        super().__init__(directory, ray_config(address, config, workspaces))

    @property
    def instance(self) -> str:
        return str((self.directory / "state").resolve())

    def wait_for_nodes(self, count: int, timeout_s: float = 90.0) -> list:
        def up():
            with self.client() as client:
                status = client.status()
            return status.nodes if status.cluster == "up" and len(status.nodes) == count else None
        return wait_until(up, timeout_s, lambda: f"{count} nodes up with agents:\n{self.log()[-3000:]}")

    def marked(self) -> list[int]:
        return marked_processes(self.instance)

    def stop(self) -> int:
        code = super().stop()
        wait_until(lambda: not self.marked(), 60, lambda: f"the nodes' processes of this daemon gone: {self.marked()}")
        return code


def marked_processes(instance: str) -> list[int]:
    """The processes (of every node on this machine) that a daemon with state dir
    `instance` started: each agent marks its zygote, workers and their commands."""
    from genvisor.supervisor import linux

    return [p for p in psutil.pids()
            if (linux.environ_value(p, linux.INSTANCE_ENV) or "").startswith(instance + "@")]


@pytest.fixture(scope="session")
def ray_cluster():
    """A two-node Ray cluster on this machine (Ray's own cluster_utils), for the session."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="session")
def ray_daemon(ray_cluster, tmp_path_factory):
    d = RayDaemon(tmp_path_factory.mktemp("ray-daemon"), ray_cluster.address).start()
    d.wait_for_nodes(2)
    yield d
    code = d.stop()
    assert code == 0, f"daemon exited {code}:\n{d.log()}"


@pytest.fixture(scope="module", params=["in_process", "worker_process", "ray"])
def connect(request, tmp_path_factory):
    """A client factory for each executor: the embedded daemon (runs in-process), a
    real daemon (a fresh worker process per run), and a real daemon whose runs go to a
    two-node Ray cluster (a fresh worker process per run, on a node). Tests using it
    run on all three."""
    if request.param == "ray":
        return request.getfixturevalue("ray_daemon").client
    if request.param == "in_process":
        from genvisor.client import Client
        from genvisor.daemon.config import load_config
        from genvisor.daemon.embedded import EmbeddedDaemon

        directory = tmp_path_factory.mktemp("embedded")
        path = directory / "genvisor.toml"
        path.write_text(TEST_CONFIG)
        embedded = EmbeddedDaemon(load_config(path, state_dir=str(directory / "state"))).__enter__()
        request.addfinalizer(embedded.close)
        return functools.partial(Client, transport=embedded.connect)
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
    proc = wait_until(lambda: find_tagged(tag), timeout_s, f"a process tagged {tag}")
    return os.getsid(proc.pid)


def find_tagged(tag: str) -> psutil.Process | None:
    """The process whose command line carries `tag` (a `spawn` argv marks a run): as
    `sh -c "…; exec sleep TAG"` until the exec, as `sleep TAG` after — the same pid."""
    for proc in psutil.process_iter(["cmdline"]):
        if tag in " ".join(proc.info["cmdline"] or []).split():
            return proc
    return None
