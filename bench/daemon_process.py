"""One `genvisor serve` process — started, answering, stopped — and the waits on
processes that the tests and the benches share.

tests/conftest.py and bench/harness.py each build on `DaemonProcess`: the tests add
their checks (nothing outlives a stop), the benches their measurements (spares,
RSS, a traced daemon). It lives here, not under tests/, because the dependency may
only point one way: the tests already use the bench's tooling (test_fuzz_runs), and
the bench must run where the test tree is not (against another venv's genvisor, in
an A/B run). It imports nothing of genvisor but the client, the one thing both sides
drive the daemon with.

Every wait here has a deadline and, when it passes, says what it waited for: a wait
that runs out is a failure, never a result.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil

from genvisor.client import Client
from genvisor.errors import DaemonUnavailable

T = TypeVar("T")

# Between two looks at something a poll waits for, it sleeps this long: a yield to the
# processes it waits on (a poll that never sleeps takes a whole core of a two-core
# machine from them), far below anything it waits for.
POLL_YIELD_S = 0.005


class WaitTimedOut(AssertionError):
    """A wait passed its deadline: what it waited for did not happen. An AssertionError,
    so that a test reports it as the failed expectation it is."""


class DaemonFailed(RuntimeError):
    """The daemon exited, or did not answer, start or stop in time."""


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str | Callable[[], str], *,
               interval_s: float = POLL_YIELD_S) -> T:
    """Call `predicate` until it returns something true, and return that. At the
    deadline raise WaitTimedOut naming `what` (a callable is asked then, to describe
    the state it found) and the last value seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            described = what() if callable(what) else what
            raise WaitTimedOut(f"timed out after {timeout_s:g} s waiting for {described} (last seen: {value!r})")
        time.sleep(interval_s)


def readable(fd: int, timeout_s: float) -> bool:
    """Whether `fd` became readable within `timeout_s` (a pidfd is, once its process exits)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(timeout_s * 1000))))


def wait_for_exit(pids: list[int], timeout_s: float) -> list[int]:
    """Wait on pidfds until every pid has exited; returns those still alive at the
    deadline (psutil.wait_procs polls, and takes seconds over processes that are not
    our children)."""
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


class DaemonProcess:
    """`python -m genvisor serve` on an ipc socket in `directory`, with `config` as its
    config file, its state in directory/state and its output in directory/daemon.log.

    `command()` says how it is started (subclasses start it otherwise: under systemd's
    environment, traced, with a test store); `client()` how it is reached."""

    start_timeout_s = 30.0
    stop_timeout_s = 60.0
    client_timeout_ms = 10_000

    def __init__(self, directory: Path, config: str, *, env: dict[str, str] | None = None, python: str = sys.executable,
                 cwd: Path | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.endpoint = f"ipc://{directory}/run/genvisor.sock"
        self.config_path = directory / "genvisor.toml"
        self.config_path.write_text(config)
        self.log_path = directory / "daemon.log"
        self.env = {**os.environ, **(env or {})}
        self.python = python
        self.cwd = cwd
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [self.python, "-m", "genvisor", *self.serve_arguments()]

    def serve_arguments(self) -> list[str]:
        return ["serve", "--endpoint", self.endpoint, "--config", str(self.config_path), "--state-dir", str(self.directory / "state")]

    def launch(self) -> None:
        """Start the process, without waiting for it to answer."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=log, env=self.env, cwd=self.cwd)

    def start(self) -> DaemonProcess:
        """Start it (again, after a stop or a kill: the same state dir) and return once
        it answers a ping."""
        self.launch()
        self.wait_answering()
        return self

    def wait_answering(self) -> None:
        assert self.process is not None
        # A ping fails at once until the daemon's socket exists, then waits up to 250 ms.
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DaemonFailed(f"daemon exited {self.process.returncode} at start:\n{self.log()}")
            with self.client(timeout_ms=250) as client:
                try:
                    client.ping()
                    return
                except DaemonUnavailable:
                    pass
            try:  # no socket yet, so that failed at once: look again shortly, or now if it exits
                self.process.wait(timeout=0.02)
            except subprocess.TimeoutExpired:
                pass
        raise DaemonFailed(f"daemon did not answer a ping within {self.start_timeout_s:g} s:\n{self.log()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def client(self, timeout_ms: int | None = None) -> Client:
        return Client(self.endpoint, timeout_ms=self.client_timeout_ms if timeout_ms is None else timeout_ms)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> int:
        """SIGTERM, and its exit code once it has exited. One that has not within
        `stop_timeout_s` is killed, and that raises DaemonFailed."""
        assert self.process is not None
        if self.process.poll() is not None:
            return self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=self.stop_timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise DaemonFailed(f"daemon did not exit within {self.stop_timeout_s:g} s of SIGTERM (killed):\n{self.log()[-4000:]}") from None

    def kill(self) -> list[int]:
        """SIGKILL the daemon alone, and reap it; returns the pids that were its
        descendants (to wait for: they die after it, not with it)."""
        assert self.process is not None
        family = [p.pid for p in self.descendants()]
        self.process.kill()
        self.process.wait()
        return family
