"""`make run`'s demo: a daemon of its own in a temp dir, beside any daemon already
serving, that leaves nothing behind — and says at once when its daemon cannot start."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from conftest import Daemon


def _demo(env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genvisor", "demo"], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})


def _fresh_home(tmp_path) -> dict[str, str]:
    return {"HOME": str(tmp_path / "home"), "XDG_STATE_HOME": str(tmp_path / "home" / ".local" / "state"),
            "XDG_RUNTIME_DIR": str(tmp_path / "run")}


def test_the_demo_leaves_nothing_in_the_users_state_dir(tmp_path):
    env = _fresh_home(tmp_path)
    done = _demo(env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "daemon up" in done.stdout and "daemon stopped (exit 0)" in done.stdout
    assert not (tmp_path / "home" / ".local" / "state" / "genvisor").exists()


def test_the_demo_runs_beside_a_daemon_already_serving_and_leaves_its_journal_alone(tmp_path):
    env = _fresh_home(tmp_path)
    (tmp_path / "serve").mkdir()
    serving = Daemon(tmp_path / "serve", env=env)
    serving.endpoint = f"ipc://{tmp_path}/run/genvisor/genvisor.sock"  # the default endpoint of that environment
    serving.start()
    try:
        done = _demo(env)
        assert done.returncode == 0, done.stdout + done.stderr
        with serving.client() as client:
            assert client.status().conversations == 0  # the demo spoke to its own daemon
    finally:
        assert serving.stop() == 0


def test_the_demo_fails_at_once_when_its_daemon_cannot_start(tmp_path):
    # A daemon that refuses to start, as one does (one line, exit 2): the demo says so
    # at once, with that line, instead of waiting out its timeout.
    refusing = tmp_path / "refusing"
    refusing.mkdir()
    (refusing / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if sys.argv[1:2] == ['serve']:\n"
        "    print('genvisor serve: refused for the test', file=sys.stderr)\n"
        "    os._exit(2)\n"
    )
    started = time.monotonic()
    done = _demo({**_fresh_home(tmp_path), "PYTHONPATH": f"{refusing}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}, timeout=60)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "the demo's daemon exited (2) before it answered: genvisor serve: refused for the test" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 20


def test_an_ipc_path_too_long_for_a_socket_is_a_usage_error(tmp_path):
    endpoint = "ipc://" + str(tmp_path / ("d" * 120) / "genvisor.sock")
    for argv in (["ping", "--endpoint", endpoint], ["serve", "--endpoint", endpoint, "--state-dir", str(tmp_path / "s")]):
        done = subprocess.run([sys.executable, "-m", "genvisor", *argv], capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, done.stderr
        assert "a unix socket's path has at most 107" in done.stderr and "Traceback" not in done.stderr
