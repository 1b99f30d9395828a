"""The `genvisor` command line against real daemons: Ctrl-C and --detach, waiting as
long as the run takes, failing at once with no daemon, and one JSON value per verb."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from conftest import Daemon, wait_for_exit
from genvisor.client import Client
from genvisor.errors import DaemonUnavailable, GenerationCanceled
from genvisor.types import ROLES

GENVISOR = [sys.executable, "-m", "genvisor"]
REF = re.compile(r"gen_[A-Za-z0-9_-]+")


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*GENVISOR, *args], capture_output=True, text=True, timeout=timeout)


def streaming(n: int = 100, delay_ms: int = 200) -> str:
    """backend_opts for a run that streams `n` deltas, one every `delay_ms`."""
    return json.dumps({"chunks": [f"c{i} " for i in range(n)], "chunk_delay_ms": delay_ms})


class Cli:
    """A CLI process whose output is read as it comes (stderr on a pty with `tty`)."""

    def __init__(self, *args: str, tty: bool = False) -> None:
        self.buffers = {"out": bytearray(), "err": bytearray()}
        self._fds: dict[int, str] = {}
        stderr: int
        if tty:
            master, stderr = pty.openpty()
        self.process = subprocess.Popen([*GENVISOR, *args], stdout=subprocess.PIPE,
                                        stderr=stderr if tty else subprocess.PIPE)
        if tty:
            os.close(stderr)
            self._fds[master] = "err"
        else:
            self._fds[self.process.stderr.fileno()] = "err"
        self._fds[self.process.stdout.fileno()] = "out"
        self.started = time.monotonic()

    def _read(self, timeout_s: float) -> bool:
        """Read what is there (waiting up to `timeout_s`); False once every stream is closed."""
        if not self._fds:
            return False
        poller = select.poll()
        for fd in self._fds:
            poller.register(fd, select.POLLIN | select.POLLHUP)
        for fd, _ in poller.poll(int(timeout_s * 1000)):
            try:
                data = os.read(fd, 65536)
            except OSError:  # a pty's master reads EIO once the child side is gone
                data = b""
            if data:
                self.buffers[self._fds[fd]] += data
            else:
                del self._fds[fd]
        return bool(self._fds)

    def text(self, stream: str) -> str:
        return self.buffers[stream].decode(errors="replace")

    def wait_for(self, stream: str, needle: str, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while needle not in self.text(stream):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {needle!r} on std{stream} within {timeout_s}s: out={self.text('out')!r} err={self.text('err')!r}"
            if not self._read(min(remaining, 1)) and needle not in self.text(stream):
                raise AssertionError(f"the CLI closed its output without {needle!r} on std{stream}: "
                                     f"out={self.text('out')!r} err={self.text('err')!r}")

    def finish(self, timeout_s: float = 30) -> int:
        deadline = time.monotonic() + timeout_s
        while self._read(max(0, min(deadline - time.monotonic(), 1))):
            assert time.monotonic() < deadline, f"still running after {timeout_s}s: err={self.text('err')!r}"
        for fd in self._fds:
            os.close(fd)
        return self.process.wait(timeout=max(1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def cli():
    started: list[Cli] = []

    def start(*args: str, tty: bool = False) -> Cli:
        started.append(Cli(*args, tty=tty))
        return started[-1]

    yield start
    for process in started:
        process.close()


def assert_no_traceback(text: str) -> None:
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text


# ---- 12: Ctrl-C and --detach ---------------------------------------------------------------


def _canceled_for(daemon: Daemon, conv: str, ref: str) -> str:
    with daemon.client() as other:
        with pytest.raises(GenerationCanceled) as raised:
            other.await_generation(conv, ref, timeout_ms=5_000)
        assert other.derived_state(conv).active_run is None
    return raised.value.reason


def test_ctrl_c_on_send_cancels_its_run_and_exits_130(shared_daemon, conv, cli):
    process = cli("--endpoint", shared_daemon.endpoint, "send", conv, "hello", "--backend-opts", streaming())
    process.wait_for("out", "c0 ")
    process.process.send_signal(signal.SIGINT)
    assert process.finish() == 130
    err = process.text("err")
    assert_no_traceback(err)
    assert len(err.strip().splitlines()) == 1, err
    refs = REF.findall(err)
    assert refs and "canceled" in err and "client_interrupt" in err, err
    assert _canceled_for(shared_daemon, conv, refs[0]) == "client_interrupt"


def test_ctrl_c_on_await_cancels_the_run(shared_daemon, conv, cli):
    with shared_daemon.client() as client:
        client.send_user_message(conv, "hello")
        ref = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 60_000})
    # On a terminal the CLI says what it waits for (and what Ctrl-C does): wait for that.
    process = cli("--endpoint", shared_daemon.endpoint, "await", conv, ref, tty=True)
    process.wait_for("err", "Ctrl-C")
    process.process.send_signal(signal.SIGINT)
    assert process.finish() == 130
    err = process.text("err")
    assert_no_traceback(err)
    assert ref in err and "canceled" in err.splitlines()[-1], err
    assert _canceled_for(shared_daemon, conv, ref) == "client_interrupt"


def test_ctrl_c_with_detach_leaves_the_run_running_and_says_how_to_follow_it(shared_daemon, conv, cli):
    process = cli("--endpoint", shared_daemon.endpoint, "send", conv, "hello", "--detach", "--backend-opts", streaming(n=10))
    process.wait_for("out", "c0 ")
    process.process.send_signal(signal.SIGINT)
    assert process.finish() == 130
    err = process.text("err")
    assert_no_traceback(err)
    ref = REF.findall(err)[0]
    assert f"genvisor await {conv} {ref}" in err, err
    with shared_daemon.client() as other:
        assert other.derived_state(conv).active_run is not None
    follow = run("--endpoint", shared_daemon.endpoint, "await", conv, ref)
    assert follow.returncode == 0, follow.stderr
    assert follow.stdout.strip() == "".join(f"c{i} " for i in range(10)).strip()


def test_ctrl_c_on_await_with_detach_leaves_it_running(shared_daemon, conv, cli):
    with shared_daemon.client() as client:
        client.send_user_message(conv, "hello")
        ref = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 60_000})
        process = cli("--endpoint", shared_daemon.endpoint, "await", conv, ref, "--detach", tty=True)
        process.wait_for("err", "Ctrl-C")
        process.process.send_signal(signal.SIGINT)
        assert process.finish() == 130
        assert f"genvisor await {conv} {ref}" in process.text("err")
        assert client.derived_state(conv).active_run is not None
        client.cancel_generation(conv, "test_done")


def test_a_second_ctrl_c_while_canceling_exits_at_once(daemon, conv, cli):
    process = cli("--endpoint", daemon.endpoint, "--timeout-ms", "60000", "send", conv, "hello", "--backend-opts", streaming())
    process.wait_for("out", "c0 ")
    daemon.process.send_signal(signal.SIGSTOP)  # the cancel cannot be answered
    try:
        process.process.send_signal(signal.SIGINT)
        process.wait_for("err", "canceling")
        process.process.send_signal(signal.SIGINT)
        assert process.finish(timeout_s=10) == 130
        assert time.monotonic() - process.started < 30
    finally:
        daemon.process.send_signal(signal.SIGCONT)
    err = process.text("err")
    assert_no_traceback(err)
    assert "may still be running" in err and f"genvisor cancel {conv}" in err, err


# ---- 13: the CLI waits as long as the run takes ----------------------------------------------


def test_send_and_await_follow_the_runs_deadline_by_default():
    """No await timeout unless one is given: the daemon is asked to wait for the outcome
    (timeout_ms None), and only the run's own deadline ends it."""
    from genvisor.client.cli import _parser

    for argv in (["send", "c", "hi"], ["await", "c", "gen_x"]):
        args = _parser().parse_args(argv)
        assert args.await_timeout_ms is None and not args.no_cancel_on_timeout and not args.detach
    assert _parser().parse_args(["await", "c", "gen_x", "--await-timeout-ms", "5"]).await_timeout_ms == 5


def test_send_waits_for_a_run_longer_than_the_client_timeout(shared_daemon, conv):
    done = run("--endpoint", shared_daemon.endpoint, "--timeout-ms", "1000", "send", conv, "slow",
               "--backend-opts", '{"delay_ms": 2500}')
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "slow"


def test_await_waits_for_a_run_longer_than_the_client_timeout(shared_daemon, conv):
    with shared_daemon.client() as client:
        client.send_user_message(conv, "slow")
        ref = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 2500})
    done = run("--endpoint", shared_daemon.endpoint, "--timeout-ms", "1000", "await", conv, ref)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "slow"


def test_an_await_timeout_given_still_cancels_unless_told_not_to(shared_daemon, conv):
    done = run("--endpoint", shared_daemon.endpoint, "send", conv, "x", "--await-timeout-ms", "200",
               "--backend-opts", '{"delay_ms": 60000}')
    assert done.returncode == 1 and "await_timeout" in done.stderr, done.stderr
    with shared_daemon.client() as client:
        assert client.derived_state(conv).active_run is None
        ref = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 60_000})
        done = run("--endpoint", shared_daemon.endpoint, "await", conv, ref, "--await-timeout-ms", "200", "--no-cancel-on-timeout")
        assert done.returncode == 1 and "await_timeout" in done.stderr, done.stderr
        assert client.derived_state(conv).active_run is not None
        client.cancel_generation(conv, "test_done")


def test_the_client_waits_for_the_run_with_no_await_timeout(shared_daemon, conv):
    with Client(shared_daemon.endpoint, timeout_ms=500) as client:
        client.send_user_message(conv, "slow")
        ref = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 1500})
        assert client.await_generation(conv, ref, timeout_ms=None).text == "slow"
        _, result = client.send_and_generate(conv, "again", generation_opts={"backend_opts": {"delay_ms": 1500}},
                                             await_opts={"timeout_ms": None})
        assert result.text == "again"


def test_await_generation_streams_the_events_of_its_run(shared_daemon, conv):
    with shared_daemon.client() as client:
        client.send_user_message(conv, "x")
        ref = client.generate_assistant_reply(conv, events=True, backend_opts={"chunks": ["a", "b", "c"]})
        events = []
        result = client.await_generation(conv, ref, on_event=events.append)
    assert result.text == "abc"
    assert "".join(e.text for e in events if e.kind == "delta") == "abc"
    assert all(e.ref == ref for e in events)


def _kill(daemon: Daemon) -> None:
    family = [p.pid for p in daemon.descendants()]
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(timeout=30)
    assert not wait_for_exit(family, timeout_s=10)


def test_a_daemon_killed_mid_await_ends_the_cli_at_once(tmp_path, conv, cli):
    d = Daemon(tmp_path).start()
    try:
        process = cli("--endpoint", d.endpoint, "--timeout-ms", "60000", "send", conv, "hello", "--backend-opts", streaming())
        process.wait_for("out", "c0 ")
        killed = time.monotonic()
        _kill(d)
        assert process.finish(timeout_s=20) == 3
        assert time.monotonic() - killed < 10  # not the 60 s client timeout
    finally:
        d.stop()
    err = process.text("err")
    assert_no_traceback(err)
    assert "daemon" in err and "closed the connection" in err, err


def test_a_daemon_killed_mid_await_ends_an_unbounded_client_wait(tmp_path, conv):
    d = Daemon(tmp_path).start()
    try:
        with Client(d.endpoint, timeout_ms=60_000) as client:
            client.send_user_message(conv, "x")
            ref = client.generate_assistant_reply(conv, events=True, backend_opts=json.loads(streaming()))
            seen = []

            def on_event(event) -> None:
                if event.kind == "delta" and not seen:
                    seen.append(event)
                    _kill(d)

            started = time.monotonic()
            with pytest.raises(DaemonUnavailable, match="closed the connection"):
                client.await_generation(conv, ref, timeout_ms=None, on_event=on_event)
            assert seen and time.monotonic() - started < 20
    finally:
        d.stop()


def test_a_reply_already_queued_is_read_before_the_lost_connection(tmp_path):
    from genvisor.client.dealer import WatchedDealer

    endpoint = f"ipc://{tmp_path}/fake.sock"
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.bind(endpoint)
    dealer = WatchedDealer(endpoint, None)
    try:
        dealer.send(b"request")
        assert router.poll(10_000)
        peer, _ = router.recv_multipart()
        router.send_multipart([peer, b"reply"])
        router.close(linger=5_000)  # flushes the reply, then the connection goes
        # Both the reply and the news of the lost connection are there before we look.
        deadline = time.monotonic() + 10
        while not dealer.lost:
            assert time.monotonic() < deadline, "the lost connection was never seen"
            dealer.poll(50)
        assert dealer.poll_reply(1_000) == zmq.POLLIN and dealer.recv() == b"reply"
        with pytest.raises(DaemonUnavailable, match="closed the connection"):
            dealer.poll_reply(1_000)
    finally:
        dealer.close()


def test_a_refusal_seen_before_the_wait_fails_it_at_once(tmp_path):
    from genvisor.client.dealer import WatchedDealer

    public, secret = zmq.curve_keypair()
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.curve_server, router.curve_secretkey, router.curve_publickey = True, secret, public
    endpoint = f"ipc://{tmp_path}/curve.sock"
    router.bind(endpoint)
    dealer = WatchedDealer(endpoint, None)  # plaintext at a CURVE endpoint: refused at the handshake
    try:
        deadline = time.monotonic() + 10
        while not dealer._refusal and dealer._monitor.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            dealer._watch()
        assert dealer._refusal, "the handshake never failed"
        # Taken in before the wait (as `send` does); no more handshakes, so no more news:
        # the wait must act on what it already has.
        router.close(linger=0)
        started = time.monotonic()
        with pytest.raises(DaemonUnavailable, match="requires CURVE"):
            dealer.poll_reply(10_000)
        assert time.monotonic() - started < 2
    finally:
        dealer.close()
        router.close(linger=0)


# ---- 14: no daemon, and flags before or after the verb --------------------------------------


def _assert_fails_at_once(endpoint: str) -> None:
    started = time.monotonic()
    with Client(endpoint, timeout_ms=30_000) as client:
        with pytest.raises(DaemonUnavailable, match=r"no daemon at ipc://.*; start one with `genvisor serve"):
            client.ping()
    done = run("--endpoint", endpoint, "--timeout-ms", "30000", "ping")
    assert done.returncode == 3, done.stderr
    assert f"no daemon at {endpoint}; start one with `genvisor serve" in done.stderr
    assert time.monotonic() - started < 15  # not the 30 s timeouts


def test_no_socket_file_fails_at_once(tmp_path):
    _assert_fails_at_once(f"ipc://{tmp_path}/nobody.sock")


def test_a_socket_nobody_listens_on_fails_at_once(tmp_path):
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as bound:
        bound.bind(str(path))  # bound, never listening: connect is refused
        _assert_fails_at_once(f"ipc://{path}")


def test_the_socket_a_killed_daemon_left_fails_at_once(tmp_path):
    d = Daemon(tmp_path).start()
    _kill(d)
    assert Path(d.endpoint.removeprefix("ipc://")).exists()
    _assert_fails_at_once(d.endpoint)


def test_tcp_still_waits_out_the_timeout():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Client(f"tcp://127.0.0.1:{port}", timeout_ms=300) as client:
        with pytest.raises(DaemonUnavailable, match="no answer .* within 300 ms"):
            client.ping()


@pytest.mark.parametrize("where", ["before", "after"])
def test_daemon_flags_and_json_go_before_or_after_the_verb(shared_daemon, conv, where):
    flags = ["--endpoint", shared_daemon.endpoint, "--timeout-ms", "5000", "--json"]
    for verb in (["ping"], ["status"], ["send", conv, "hi"], ["messages", conv]):
        args = [*flags, *verb] if where == "before" else [*verb, *flags]
        done = run(*args)
        assert done.returncode == 0, (args, done.stderr)
        json.loads(done.stdout)
    human = run("ping", "--endpoint", shared_daemon.endpoint)
    assert human.returncode == 0 and f"pid {shared_daemon.pid}" in human.stdout, human.stderr


def test_an_endpoint_before_serve_is_the_daemons():
    done = run("--endpoint", "nowhere", "serve", "--state-dir", "/nonexistent")
    assert done.returncode == 2 and "genvisor serve: endpoint 'nowhere'" in done.stderr, done.stderr


def test_the_demo_waits_for_its_daemon_to_come_up():
    done = run("demo", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "daemon up" in done.stdout and "daemon stopped (exit 0)" in done.stdout


def test_the_key_flags_go_after_the_verb_too(tmp_path):
    done = run("ping", "--endpoint", "tcp://127.0.0.1:1", "--server-key", str(tmp_path / "missing.key"),
               "--client-key", str(tmp_path / "missing.key_secret"))
    assert done.returncode == 2 and "missing.key" in done.stderr and "unrecognized" not in done.stderr, done.stderr


# ---- 17: consistency -------------------------------------------------------------------------


def test_every_verb_prints_one_json_value(shared_daemon, conv, tmp_path):
    e = ["--endpoint", shared_daemon.endpoint, "--json"]
    with shared_daemon.client() as client:
        client.send_user_message(conv + "g", "x")
        ref = client.generate_assistant_reply(conv + "g")
    verbs = [
        ["ping"], ["modes"], ["telemetry"], ["status"], ["start", conv], ["message", conv, "hi"],
        ["record", conv, "hello"], ["messages", conv], ["context", conv], ["timeline", conv], ["entries", conv],
        ["configure-llm", conv, "--model", "m"], ["skills", conv], ["skills", conv, "read_file"], ["mode", conv],
        ["state", conv], ["send", conv, "again"], ["await", conv + "g", ref], ["keygen", str(tmp_path / "keys"), "k"],
    ]
    for verb in verbs:
        done = run(*e, *verb)
        assert done.returncode == 0, (verb, done.stderr)
        json.loads(done.stdout)  # exactly one value
    generate = run(*e, "generate", conv, "--backend-opts", '{"delay_ms": 60000}')
    ref = json.loads(generate.stdout)["ref"]
    assert REF.fullmatch(ref)
    cancel = run(*e, "cancel", conv)
    assert cancel.returncode == 0 and json.loads(cancel.stdout) == {"canceled": True}, cancel.stderr
    stop = run(*e, "stop", conv)
    assert stop.returncode == 0 and json.loads(stop.stdout) == {"stopped": True}, stop.stderr
    assert run("--endpoint", shared_daemon.endpoint, "cancel", conv + "g").returncode == 1


def test_json_errors_are_json_on_stderr_with_the_same_exit_codes(shared_daemon, conv, tmp_path):
    e = ["--endpoint", shared_daemon.endpoint, "--json"]
    missing = run(*e, "state", conv)
    assert missing.returncode == 1 and missing.stdout == ""
    assert json.loads(missing.stderr)["error"]["code"] == "not_found"

    failing = json.dumps({"error": {"category": "provider", "message": "down", "details": {"status": 503}}})
    failed = run(*e, "send", conv, "x", "--backend-opts", failing)
    assert failed.returncode == 1
    error = json.loads(failed.stderr)["error"]
    assert error == {"code": "llm_error", "message": "down", "category": "provider", "retryable": True,
                     "details": {"status": 503, "workspace": "unchanged"}}

    nobody = run("--json", "--endpoint", f"ipc://{tmp_path}/nobody.sock", "ping")
    assert nobody.returncode == 3 and json.loads(nobody.stderr)["error"]["code"] == "daemon_unavailable"

    usage = run(*e, "messages", conv, "--role", "bogus")
    assert usage.returncode == 2 and json.loads(usage.stderr)["error"]["code"] == "usage"
    bad_endpoint = run("--json", "--endpoint", "nowhere", "ping")
    assert bad_endpoint.returncode == 2 and json.loads(bad_endpoint.stderr)["error"]["code"] == "usage"


def test_human_errors_name_the_code(shared_daemon, conv):
    done = run("--endpoint", shared_daemon.endpoint, "state", conv)
    assert done.returncode == 1 and done.stderr.startswith("error: not_found: "), done.stderr


def test_skills_with_no_names_shows_them_and_none_turns_them_off(shared_daemon, conv):
    e = ["--endpoint", shared_daemon.endpoint]
    run(*e, "start", conv)
    shown = run(*e, "skills", conv)
    assert shown.returncode == 0 and shown.stdout.strip() == "read_file, list_dir, search_text, write_file, edit_file"
    assert json.loads(run(*e, "--json", "skills", conv).stdout) == {
        "skills": ["read_file", "list_dir", "search_text", "write_file", "edit_file"]}
    assert run(*e, "skills", conv, "run_command").stdout.strip() == "run_command"
    assert run(*e, "skills", conv).stdout.strip() == "run_command"
    off = run(*e, "skills", conv, "--none")
    assert off.returncode == 0 and off.stdout.strip() == "(none)"
    with shared_daemon.client() as client:
        assert client.conversation(conv).state.skills == []
    assert run(*e, "skills", conv, "--none", "read_file").returncode == 2


def test_an_unknown_skill_is_a_usage_error_naming_the_known_ones(shared_daemon, conv):
    done = run("--endpoint", shared_daemon.endpoint, "skills", conv, "read_file", "fly")
    assert done.returncode == 2
    assert "unknown skill 'fly'" in done.stderr and "run_command" in done.stderr and "read_file" in done.stderr


def test_the_cli_knows_the_daemons_tools():
    from genvisor.client.cli import SKILLS
    from genvisor.modes.tools import DEFAULT_SKILLS, SPECS

    assert list(SKILLS) == list(SPECS)
    assert set(DEFAULT_SKILLS) <= set(SKILLS)


def test_messages_role_is_one_of_the_roles(shared_daemon, conv):
    done = run("--endpoint", shared_daemon.endpoint, "messages", conv, "--role", "bogus")
    assert done.returncode == 2 and "invalid choice: 'bogus'" in done.stderr
    for role in ROLES:
        assert f"'{role}'" in done.stderr


def test_a_closed_stdout_ends_quietly(shared_daemon, conv):
    run("--endpoint", shared_daemon.endpoint, "send", conv, "hi")
    for verb in (["status"], ["messages", conv], ["send", conv, "more", "--backend-opts", streaming(n=3, delay_ms=0)]):
        read, write = os.pipe()
        os.close(read)  # like `| head` that has already exited
        try:
            done = subprocess.run([*GENVISOR, "--endpoint", shared_daemon.endpoint, *verb], stdout=write,
                                  stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(write)
        assert done.returncode == 141, (verb, done.stderr)
        assert done.stderr == "", (verb, done.stderr)


def test_a_bad_json_argument_reads_well(shared_daemon, conv):
    for value, problem in (("[1]", "not a JSON object: [1]"), ("{", "not JSON: ")):
        done = run("--endpoint", shared_daemon.endpoint, "send", conv, "x", "--options", value)
        assert done.returncode == 2
        assert f"argument --options: {problem}" in done.stderr, done.stderr
        assert "_json" not in done.stderr


def test_state_says_what_the_status_means_and_shows_the_active_run(shared_daemon, conv):
    e = ["--endpoint", shared_daemon.endpoint]
    run(*e, "start", conv)
    assert "idle (no message yet)" in run(*e, "state", conv).stdout
    with shared_daemon.client() as client:
        client.send_user_message(conv, "hi")
        client.generate_assistant_reply(conv, backend_opts={"delay_ms": 60_000})
        state = client.derived_state(conv)
        shown = run(*e, "state", conv).stdout
        assert "pending_llm (the last user message awaits its reply)" in shown, shown
        run_line = next(line for line in shown.splitlines() if "active run" in line)
        assert state.active_run.run_id in run_line and "running" in run_line and "step llm_request" in run_line
        assert "started" in run_line
        client.cancel_generation(conv, "test_done")
    shown = run(*e, "state", conv).stdout
    assert "canceled (the last generation was canceled: test_done)" in shown and "active run" not in shown, shown
    run(*e, "send", conv, "again")
    assert "responding (the last turn has its reply)" in run(*e, "state", conv).stdout


def test_changes_prints_what_a_turn_changed_and_revert_undoes_it(shared_daemon, conv, tmp_path):
    e = ["--endpoint", shared_daemon.endpoint]
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "notes.txt").write_text("old line\n")
    run(*e, "start", conv, "--metadata", json.dumps({"workspace": str(workspace)}))
    script = [{"tool_calls": [{"name": "write_file", "arguments": {"path": "notes.txt", "content": "new line\n"}}]},
              {"text": "done"}]
    sent = run(*e, "send", conv, "edit it", "--backend-opts", json.dumps({"script": script}))
    assert sent.returncode == 0, sent.stderr
    told = re.search(r"\[workspace\] 1 file\(s\) changed: `genvisor changes \S+ (\S+) .*` shows them", sent.stderr)
    assert told, sent.stderr
    ref = told.group(1)
    shown = run(*e, "changes", conv, ref)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("M notes.txt (9 → 9 bytes)\n") and "-old line\n+new line\n" in shown.stdout
    assert run(*e, "changes", conv, ref, "--stat").stdout == "M notes.txt (9 → 9 bytes)\n"
    (workspace / "notes.txt").write_text("edited since\n")
    conflict = run(*e, "revert", conv, ref)
    assert conflict.returncode == 1 and conflict.stderr.startswith("error: revert_conflict: ") and "notes.txt" in conflict.stderr
    (workspace / "notes.txt").write_text("new line\n")
    reverted = run(*e, "--json", "revert", conv, ref, "--reason", "wrong file")
    assert reverted.returncode == 0, reverted.stderr
    assert json.loads(reverted.stdout)["reverts"] == ref and (workspace / "notes.txt").read_text() == "old line\n"
