"""A real daemon for a scenario: `genvisor serve` in a scratch dir with a config, and
the process measurements the scenarios take of it (RSS, fds, its workers)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import psutil

from genvisor.client import Client
from genvisor.errors import DaemonUnavailable

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def supports(section: str) -> bool:
    """Whether this genvisor's config has a `[section]` (admission and journal are new)."""
    from genvisor.daemon.config import Config

    return section in {f.name for f in msgspec.structs.fields(Config)}


def daemon_config(
    *,
    spares: int = 4,
    cancel_grace_ms: int = 2000,
    term_grace_ms: int = 1000,
    deadline_grace_ms: int = 5000,
    max_active: int | None = None,
    max_queued: int | None = None,
    journal: str | None = "sqlite",
) -> str:
    """A config for a bench daemon. Sections this genvisor does not know are left out,
    so the bench runs against a daemon from before admission or the journal landed."""
    lines = ["[workers]", f"spares = {spares}", f"cancel_grace_ms = {cancel_grace_ms}", f"term_grace_ms = {term_grace_ms}",
             f"deadline_grace_ms = {deadline_grace_ms}"]
    if supports("admission"):
        admission = {"max_active": max_active, "max_queued": max_queued}
        lines += ["[admission]", *(f"{k} = {v}" for k, v in admission.items() if v is not None)]
    if journal is not None and supports("journal"):
        lines += ["[journal]", f'backend = "{journal}"']
    return "\n".join(lines) + "\n"


class Daemon:
    """`with Daemon(directory, config) as d:` — started, answering, stopped with SIGTERM."""

    def __init__(
        self, directory: Path, config: str, *, traced: Path | None = None, python: str = sys.executable, log_level: str = "WARNING"
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.endpoint = f"ipc://{directory}/run/genvisor.sock"
        (directory / "genvisor.toml").write_text(config)
        self.traced = traced
        self.python = python
        self.log_level = log_level
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Daemon:
        return self.start()

    def start(self) -> Daemon:
        """Start it (again, after `kill`: same state dir) and wait until it answers."""
        env = {**os.environ, "GENVISOR_LOG_LEVEL": self.log_level}
        # The traced daemon (bench.traced_daemon) is the same daemon with timestamps taken at
        # each hop of a generation. It runs in the repo so that it, and the zygote it
        # starts with `python -m`, import `bench`; others run elsewhere, so `python`
        # may be another venv's (an A/B run) without this tree shadowing its genvisor.
        entry = ["-m", "bench.traced_daemon", str(self.traced)] if self.traced else ["-m", "genvisor"]
        argv = [self.python, *entry, "serve", "--endpoint", self.endpoint,
                "--config", str(self.directory / "genvisor.toml"), "--state-dir", str(self.directory / "state")]
        log = open(self.directory / "daemon.log", "ab")
        cwd = REPO if self.traced else self.directory
        self.process = subprocess.Popen(argv, stdout=log, stderr=log, env=env, cwd=cwd)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited at start:\n{self.log()}")
            with Client(self.endpoint, timeout_ms=250) as client:
                try:
                    client.ping()
                    break
                except DaemonUnavailable:
                    pass
            try:  # no socket yet, so that failed at once: look again shortly, or now if it exits
                self.process.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                pass
        else:
            raise RuntimeError(f"daemon did not answer within 60 s:\n{self.log()}")
        self.wait_for_spares()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def kill(self) -> list[int]:
        """SIGKILL the daemon alone; returns the pids that were its descendants."""
        assert self.process is not None
        family = [p.pid for p in self.ps.children(recursive=True)]
        self.process.kill()
        self.process.wait()
        return family

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                return self.process.wait()
        return self.process.returncode

    def client(self, timeout_ms: int = 60_000) -> Client:
        return Client(self.endpoint, timeout_ms=timeout_ms)

    def log(self) -> str:
        return (self.directory / "daemon.log").read_text(errors="replace")

    # ---- its processes ---------------------------------------------------------------

    @property
    def ps(self) -> psutil.Process:
        assert self.process is not None
        return psutil.Process(self.process.pid)

    def zygote(self) -> psutil.Process | None:
        for child in self.ps.children():
            try:
                if "genvisor.supervisor.zygote" in " ".join(child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        return None

    def workers(self) -> list[psutil.Process]:
        zygote = self.zygote()
        try:
            return zygote.children() if zygote else []
        except psutil.NoSuchProcess:
            return []

    def wait_for_spares(self, timeout_s: float = 30.0) -> None:
        """Until the pool's spares are forked and waiting (polled with a deadline)."""
        wanted = _spares_in(self.directory / "genvisor.toml")
        deadline = time.monotonic() + timeout_s
        while len(self.workers()) < wanted and time.monotonic() < deadline:
            time.sleep(0.01)

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Until no run is active and the spares are back (polled, with a deadline):
        the state to count fds and processes in, with nothing in flight."""
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while client.status().active_runs and time.monotonic() < deadline:
                time.sleep(0.01)
        self.wait_for_spares(max(0.0, deadline - time.monotonic()))

    def rss_mib(self) -> float:
        return self.ps.memory_info().rss / MIB

    def fds(self) -> int:
        return self.ps.num_fds()

    def status(self, client: Client) -> Any | None:
        """`Client.status()` where this genvisor has it (it lands with admission)."""
        return client.status() if hasattr(client, "status") else None


def wait_for_exit(pids: list[int], timeout_s: float) -> list[int]:
    """Those of `pids` still alive at the deadline, waiting on pidfds (psutil.wait_procs
    polls, and takes seconds over processes that are not our children)."""
    deadline = time.monotonic() + timeout_s
    alive = []
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not readable(fd, deadline - time.monotonic()):
                alive.append(pid)
        finally:
            os.close(fd)
    return alive


def readable(fd: int, timeout_s: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout_s * 1000))))


def _spares_in(config: Path) -> int:
    import tomllib

    return tomllib.loads(config.read_text()).get("workers", {}).get("spares", 4)


def uss_mib(proc: psutil.Process) -> float | None:
    """Unique set size: what this process alone holds (its private, un-shared pages)."""
    try:
        return proc.memory_full_info().uss / MIB
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def living_in_group(pgid: int) -> list[int]:
    """Processes of group or session `pgid` that are alive (zombies are not)."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if (os.getpgid(proc.pid) == pgid or os.getsid(proc.pid) == pgid) and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


class CPU(msgspec.Struct, frozen=True):
    """CPU seconds so far: the daemon's, the zygote's, and its reaped workers'."""

    daemon: float
    zygote: float
    workers: float

    def per_item_ms(self, later: CPU, items: int) -> dict[str, float]:
        scale = 1000 / max(1, items)
        return {
            "daemon": (later.daemon - self.daemon) * scale,
            "zygote (fork, reap)": (later.zygote - self.zygote) * scale,
            "worker": (later.workers - self.workers) * scale,
        }


def cpu(daemon: Daemon) -> CPU:
    d = daemon.ps.cpu_times()
    zygote = daemon.zygote()
    z = zygote.cpu_times() if zygote else None
    return CPU(
        daemon=d.user + d.system,
        zygote=(z.user + z.system) if z else 0.0,
        # The zygote reaps the workers, so their CPU is its children's.
        workers=(z.children_user + z.children_system) if z else 0.0,
    )


def fd_kinds(pid: int) -> dict[str, int]:
    """What a process's open fds are: socket, pipe, anon_inode:[pidfd], a file's name…"""
    kinds: dict[str, int] = {}
    base = Path(f"/proc/{pid}/fd")
    for fd in base.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        kind = target.split(":")[0] if target.startswith(("socket:", "pipe:")) else Path(target).name if target.startswith("/") else target
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds
