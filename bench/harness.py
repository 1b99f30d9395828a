"""A real daemon for a scenario: `genvisor serve` in a scratch dir with a config, and
the process measurements the scenarios take of it (RSS, fds, its workers). Starting,
stopping and the waits are bench.daemon_process's, which the tests use too: a wait
that passes its deadline raises, naming what it waited for."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import psutil

from bench.daemon_process import DaemonFailed, DaemonProcess, WaitTimedOut, readable, wait_for_exit, wait_until  # noqa: F401 — the scenarios' too
from genvisor.client import Client

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
    if supports("approvals"):  # the scenarios that run commands run them unasked
        lines += ["[approvals]", 'run_command = "allow"']
    return "\n".join(lines) + "\n"


class Daemon(DaemonProcess):
    """`with Daemon(directory, config) as d:` — started, answering with its spares
    forked, stopped with SIGTERM (the process itself: bench.daemon_process, shared with
    the tests)."""

    start_timeout_s = 60.0
    stop_timeout_s = 120.0
    client_timeout_ms = 60_000

    def __init__(
        self, directory: Path, config: str, *, traced: Path | None = None, python: str = sys.executable, log_level: str = "WARNING"
    ) -> None:
        # The traced daemon (bench.traced_daemon) is the same daemon with timestamps taken at
        # each hop of a generation. It runs in the repo so that it, and the zygote it
        # starts with `python -m`, import `bench`; others run elsewhere, so `python`
        # may be another venv's (an A/B run) without this tree shadowing its genvisor.
        super().__init__(directory, config, env={"GENVISOR_LOG_LEVEL": log_level}, python=python,
                         cwd=REPO if traced else directory)
        self.traced = traced

    def command(self) -> list[str]:
        if self.traced:
            return [self.python, "-m", "bench.traced_daemon", str(self.traced), *self.serve_arguments()]
        return super().command()

    def __enter__(self) -> Daemon:
        return self.start()

    def start(self) -> Daemon:
        """Start it (again, after `kill`: same state dir) and wait until it answers and
        its spares are forked."""
        super().start()
        try:
            self.wait_for_spares()
        except WaitTimedOut as exc:
            raise DaemonFailed(f"daemon answered, but {exc}:\n{self.log()[-4000:]}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
        """Until the pool's spares are forked and waiting; raises WaitTimedOut if they
        are not within `timeout_s` (a figure taken without them would be of another state)."""
        wanted = _spares_in(self.config_path)
        wait_until(lambda: len(self.workers()) >= wanted, timeout_s,
                   lambda: f"{wanted} spare workers under the zygote (found {len(self.workers())})", interval_s=0.01)

    def wait_idle(self, timeout_s: float = 30.0) -> None:
        """Until no run is active and the spares are back: the state to count fds and
        processes in, with nothing in flight. Raises WaitTimedOut if it does not come."""
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            wait_until(lambda: not client.status().active_runs, timeout_s, "no active run (status().active_runs == 0)",
                       interval_s=0.01)
        self.wait_for_spares(max(0.0, deadline - time.monotonic()))

    def rss_mib(self) -> float:
        return self.ps.memory_info().rss / MIB

    def fds(self) -> int:
        return self.ps.num_fds()

    def status(self, client: Client) -> Any | None:
        """`Client.status()` where this genvisor has it (it lands with admission)."""
        return client.status() if hasattr(client, "status") else None


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
