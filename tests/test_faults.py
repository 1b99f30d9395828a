"""Faults, bounded: workers killed at each step of a run, long runs of cancels, overload.
(Heavy counts of the same: `python -m bench.faults`; daemon kills in test_journal.py.)"""

from __future__ import annotations

import os
import signal
import threading
from concurrent import futures

import psutil
import pytest

from conftest import (
    TEST_CONFIG,
    Daemon,
    find_tagged,
    spawn_marker,
    wait_for_exit,
    wait_for_group_gone,
    wait_for_marker,
    wait_until,
    worker_of,
)
from genvisor.errors import GenerationCanceled, LLMError, NotFound, Overloaded


def _wait_idle(daemon: Daemon, spares: int = 1) -> None:
    """Until no run holds a worker slot (a slot is freed once its worker is reaped) and
    the spares are back (a spawn in flight holds sockets of its own)."""
    with daemon.client() as client:
        def idle() -> bool:
            status = client.status()
            return not status.active_runs and status.spare_workers >= spares

        wait_until(idle, 20, lambda: f"no active run and {spares} spare workers ({client.status()})")


def _fd_table(pid: int) -> list[str]:
    unix = {}
    for line in open("/proc/net/unix").read().splitlines()[1:]:
        parts = line.split()
        unix[parts[6]] = " ".join(parts[4:6] + parts[7:])
    table = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            target = os.readlink(f'/proc/{pid}/fd/{fd}')
            table.append(f"{fd} -> {target} {unix.get(target[8:-1], '')}")
        except OSError:
            pass
    return table


def _ppid(process: psutil.Process) -> int | None:
    try:
        return process.ppid()
    except psutil.NoSuchProcess:
        return None


def _during_llm_call(tmp_path, conv):
    argv, fifo, tag = spawn_marker(tmp_path, conv)
    return {"backend_opts": {"spawn": argv, "delay_ms": 60_000}}, fifo, tag, None


def _during_tool_call(tmp_path, conv):
    argv, fifo, tag = spawn_marker(tmp_path, conv)
    script = [{"tool_calls": [{"name": "run_command", "arguments": {"argv": argv, "timeout_ms": 60_000}}]}, {"text": "never"}]
    return {"backend_opts": {"script": script}}, fifo, tag, ["run_command"]


def _during_second_step(tmp_path, conv):
    """After one tool call came back and was fed to the model: the second step's tool."""
    argv, fifo, tag = spawn_marker(tmp_path, conv)
    script = [
        {"tool_calls": [{"name": "write_file", "arguments": {"path": "a.txt", "content": "x"}}]},
        {"tool_calls": [{"name": "run_command", "arguments": {"argv": argv, "timeout_ms": 60_000}}]},
        {"text": "never"},
    ]
    return {"backend_opts": {"script": script}}, fifo, tag, ["write_file", "run_command"]


@pytest.mark.parametrize("step", [_during_llm_call, _during_tool_call, _during_second_step], ids=lambda f: f.__name__[1:])
def test_a_worker_killed_at_any_step_is_a_typed_failure_that_changes_nothing(shared_daemon, conv, tmp_path, step):
    options, fifo, tag, skills = step(tmp_path, conv)
    with shared_daemon.client() as client:
        if skills:
            client.configure_skills(conv, skills)
        client.send_user_message(conv, "go")
        before = client.conversation_messages(conv)
        ref = client.generate_assistant_reply(conv, **options)
        wait_for_marker(fifo)
        worker = worker_of(tag)
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        assert raised.value.category == "unknown" and raised.value.message == "generation worker crashed"
        assert raised.value.details["signal"] == signal.SIGKILL
        assert client.conversation_messages(conv) == before  # no tool message, no reply
        wait_for_group_gone(worker, timeout_s=10)
        # The tool's processes (a group of their own) go too.
        wait_until(lambda: find_tagged(tag) is None, 10, f"the tool's process {tag} to go with its killed worker")
        _, result = client.send_and_generate(conv, "again")  # the conversation goes on
        assert result.text == "again"


def test_a_spare_worker_killed_before_its_run_is_replaced(daemon, conv):
    zygote = next(p for p in daemon.descendants() if p.ppid() == daemon.pid)
    spares = wait_until(zygote.children, 10, "a spare worker under the zygote")
    spares[0].kill()
    assert not wait_for_exit([spares[0].pid], timeout_s=10), "the killed spare did not exit"
    with daemon.client() as client:
        for i in range(3):
            _, result = client.send_and_generate(conv, f"m{i}")
            assert result.text == f"m{i}"
        assert client.status().zygote_restarts == 0


def test_many_canceled_runs_leave_nothing_and_fds_and_rss_stay_flat(daemon, conv):
    process = psutil.Process(daemon.pid)

    def cancel_runs(n: int) -> None:
        with daemon.client() as client:
            for i in range(n):
                client.send_user_message(conv, f"m{i}")
                ref = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 60_000})
                client.cancel_generation(conv, "next")
                with pytest.raises(GenerationCanceled):
                    client.await_generation(conv, ref)
        _wait_idle(daemon)

    cancel_runs(20)  # warm-up: caches, histograms, the journal's pages
    fds, rss = process.num_fds(), process.memory_info().rss
    cancel_runs(60)
    assert process.num_fds() <= fds + 2, "\n".join(_fd_table(daemon.pid))
    assert process.memory_info().rss - rss < 8 * 2**20
    # Only the zygote and its spares remain under the daemon (a worker whose spawn a
    # cancel abandoned may still be on its way out: gone counts as gone).
    parents = {p.pid: _ppid(p) for p in daemon.descendants()}
    zygote = [pid for pid, ppid in parents.items() if ppid == daemon.pid]
    assert len(zygote) == 1
    assert all(ppid in (zygote[0], None) for pid, ppid in parents.items() if pid != zygote[0])
    with daemon.client() as client:
        status = client.status()
    assert status.runs_finished["canceled"] == 80 and status.cleanup_failures == 0


def test_under_overload_the_queue_keeps_its_bound_and_admitted_runs_finish(tmp_path):
    config = TEST_CONFIG + "\n[admission]\nmax_active = 2\nmax_queued = 3\n"
    daemon = Daemon(tmp_path, config=config).start()
    done = threading.Event()

    def client_thread(n: int) -> list[str]:
        outcomes = []
        with daemon.client() as client:
            for i in range(4):
                try:
                    client.send_and_generate(f"t{n}", f"m{i}", generation_opts={"backend_opts": {"delay_ms": 20}})
                    outcomes.append("completed")
                except Overloaded:
                    outcomes.append("overloaded")
        return outcomes

    def watch() -> list[tuple[int, int]]:
        """(queued, active) samples until `done`; the test asserts on them (an assert in
        a thread would only be a warning)."""
        samples = []
        with daemon.client() as client:
            while not done.wait(0.005):  # a sample, then a yield to the daemon and the clients
                status = client.status()
                samples.append((status.queued_runs, status.active_runs))
        return samples

    try:
        with futures.ThreadPoolExecutor(max_workers=13) as pool:
            watcher = pool.submit(watch)
            clients = [pool.submit(client_thread, n) for n in range(12)]
            _, running = futures.wait(clients, timeout=120)
            done.set()
            assert not running, f"{len(running)} client threads still running after 120 s"
            outcomes = [outcome for future in clients for outcome in future.result()]  # raises what a thread raised
            samples = watcher.result(timeout=30)
        assert len(outcomes) == 48
        assert outcomes.count("overloaded") > 0 and outcomes.count("completed") > 0
        assert samples, "the watcher took no sample"
        assert max(queued for queued, _ in samples) <= 3
        assert max(active for _, active in samples) <= 2
        with daemon.client() as client:
            status = client.status()
            assert status.admissions_rejected == outcomes.count("overloaded")
            assert status.runs_finished["completed"] == outcomes.count("completed")
            for n in range(12):  # each conversation holds exactly its admitted turns, whole
                try:
                    messages = client.conversation_messages(f"t{n}")
                except NotFound:
                    continue  # every one of its turns was refused: nothing was recorded
                assert len(messages) == 2 * sum(1 for m in messages if m.role == "assistant")
    finally:
        done.set()
        assert daemon.stop() == 0, daemon.log()


def _escaping(tmp_path, name: str, *, env_stripped: bool = False) -> tuple[list[str], object, str]:
    """A `spawn` argv whose process leaves the run's process group and session (setsid),
    loses its parent, and — with `env_stripped` — every environment variable, so that
    neither the group sweep nor an environment marker can find it."""
    _, fifo, tag = spawn_marker(tmp_path, name)
    inner = f"echo up > {fifo}; exec sleep {tag}"
    env = "env -i " if env_stripped else ""
    return ["sh", "-c", f"setsid {env}sh -c '{inner}' >/dev/null 2>&1 &"], fifo, tag


def _stray_of_a_run(client, conv, tmp_path, *, env_stripped: bool = True) -> tuple[str, psutil.Process]:
    """Start a run that leaves such a process running; returns (ref, that process)."""
    argv, fifo, tag = _escaping(tmp_path, conv, env_stripped=env_stripped)
    client.send_user_message(conv, "go")
    ref = client.generate_assistant_reply(conv, backend_opts={"spawn": argv, "delay_ms": 60_000})
    wait_for_marker(fifo)
    stray = wait_until(lambda: find_tagged(tag), 10, f"the escaped process {tag}")
    assert os.getsid(stray.pid) == stray.pid  # out of the run's session and group
    return ref, stray


@pytest.mark.parametrize("env_stripped", [False, True], ids=["marked", "env_stripped"])
def test_a_process_that_escapes_its_group_dies_with_its_run(shared_daemon, conv, tmp_path, env_stripped):
    with shared_daemon.client() as client:
        ref, escapee = _stray_of_a_run(client, conv, tmp_path, env_stripped=env_stripped)
        assert escapee.is_running()  # while its run goes on, it may run too
        client.cancel_generation(conv, "done")
        with pytest.raises(GenerationCanceled):
            client.await_generation(conv, ref)
    assert not wait_for_exit([escapee.pid], timeout_s=10), "the escaped process outlived its run"


def test_an_escaped_process_dies_when_the_zygote_is_killed(daemon, conv, tmp_path):
    with daemon.client() as client:
        ref, stray = _stray_of_a_run(client, conv, tmp_path)
        zygote = next(p for p in daemon.descendants() if p.ppid() == daemon.pid and "zygote" in " ".join(p.cmdline()))
        zygote.kill()
        with pytest.raises(LLMError):
            client.await_generation(conv, ref)  # its worker died with the zygote
        # The stray, re-parented to the daemon, is killed there (not just reaped later).
        assert not wait_for_exit([stray.pid], timeout_s=10), "the stray outlived the zygote"
        _, result = client.send_and_generate(conv, "again")  # a new zygote serves on
        assert result.text == "again"


def test_an_escaped_process_dies_with_a_killed_daemon(daemon, conv, tmp_path):
    with daemon.client() as client:
        _, stray = _stray_of_a_run(client, conv, tmp_path)
    family = daemon.descendants()
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(timeout=30)
    # The zygote outlives its daemon just long enough to kill everything below it.
    assert not wait_for_exit([stray.pid] + [p.pid for p in family], timeout_s=15), "processes outlived a killed daemon"
    daemon.start()


def test_an_escaped_process_dies_when_the_daemon_stops(tmp_path, conv):
    daemon = Daemon(tmp_path).start()
    with daemon.client() as client:
        _, stray = _stray_of_a_run(client, conv, tmp_path)
    assert daemon.stop() == 0
    assert not wait_for_exit([stray.pid], timeout_s=10), "the stray outlived a graceful stop"


def test_what_a_daemon_killed_with_its_zygote_left_running_is_killed_by_its_successor(daemon, conv, tmp_path):
    """The last resort, when no process of the daemon survived to clean up: the
    successor kills what carries the daemon's marker."""
    with daemon.client() as client:
        _, stray = _stray_of_a_run(client, conv, tmp_path, env_stripped=False)
    zygote = next(p for p in daemon.descendants() if p.ppid() == daemon.pid)
    daemon.process.send_signal(signal.SIGKILL)
    zygote.kill()
    daemon.process.wait(timeout=30)
    daemon.start()
    assert not wait_for_exit([stray.pid], timeout_s=10), "the new daemon left the old one's stray running"


def test_a_daemonized_child_of_a_command_dies_when_its_run_completes(shared_daemon, conv, tmp_path):
    """A tool's command that starts a process with a new session, a stripped environment
    and no parent (a double fork): the run completes, and that process does not outlive it."""
    workspace = tmp_path / "ws"
    workspace.mkdir()
    tag = f"{300000 + os.getpid() % 1000}{len(conv)}"
    # The command returns once the daemonized process is up (it made `ready`).
    command = ["sh", "-c", f"(setsid env -i sh -c 'touch ready; exec sleep {tag}' >/dev/null 2>&1 &); "
                           "while [ ! -e ready ]; do sleep 0.005; done; echo started"]
    script = [{"tool_calls": [{"name": "run_command", "arguments": {"argv": command, "timeout_ms": 10_000}}]}, {"text": "done"}]
    with shared_daemon.client() as client:
        client.start_conversation(conv, metadata={"workspace": str(workspace)})
        client.configure_skills(conv, ["run_command"])
        client.send_user_message(conv, "daemonize something")
        ref = client.generate_assistant_reply(conv, backend_opts={"script": script})
        assert client.await_generation(conv, ref).text == "done"
        assert "started" in client.conversation_messages(conv, roles=["tool"])[0].content
    assert (workspace / "ready").exists()
    wait_until(lambda: find_tagged(tag) is None, 10, f"the daemonized process {tag} to die with its run")
