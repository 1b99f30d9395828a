"""The daemon outlives what goes wrong around it and leaves nothing behind when it stops."""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

import psutil
import pytest

from conftest import Daemon, find_tagged, spawn_marker, wait_for_group_gone, wait_for_marker, wait_until, worker_of
from genvisor.errors import DaemonUnavailable, LLMError
from genvisor.types import GenerationCanceled as CanceledNote


def _zygote(daemon: Daemon) -> psutil.Process:
    zygotes = [p for p in psutil.Process(daemon.pid).children() if "genvisor.supervisor.zygote" in " ".join(p.cmdline())]
    assert len(zygotes) == 1, zygotes
    return zygotes[0]


def test_sigterm_with_active_runs_cancels_them_and_exits_zero(daemon, conv, tmp_path):
    argv, fifo, tag = spawn_marker(tmp_path, "shutdown")
    with daemon.client() as owner:
        owner.send_user_message(conv, "long")
        ref = owner.generate_assistant_reply(conv, backend_opts={"spawn": argv, "delay_ms": 60_000})
        owner.send_user_message(conv + "_hung", "stuck")
        hung_ref = owner.generate_assistant_reply(conv + "_hung", backend_opts={"crash": "hang"})
        wait_for_marker(fifo)
        family = daemon.descendants()
        wait_until(lambda: find_tagged(tag), 10, f"the spawned process tagged {tag}")  # its command line is briefly empty while it execs
        daemon.process.send_signal(signal.SIGTERM)
        assert daemon.process.wait(timeout=60) == 0
        notes = {owner.next_notification(timeout_ms=5_000), owner.next_notification(timeout_ms=5_000)}
    assert notes == {CanceledNote(ref, "daemon_shutdown"), CanceledNote(hung_ref, "daemon_shutdown")}
    _, alive = psutil.wait_procs(family, timeout=5)
    assert alive == []
    assert find_tagged(tag) is None
    assert not Path(daemon.endpoint.removeprefix("ipc://")).exists()


def test_a_killed_zygote_is_restarted_and_generations_go_on(daemon, conv):
    first = _zygote(daemon)
    first.kill()
    first.wait(timeout=10)
    with daemon.client() as client:
        # Spares forked by the dead zygote died with it; the next run gets a new worker.
        _, result = client.send_and_generate(conv, "after the zygote died", await_opts={"timeout_ms": 30_000})
        assert result.text == "after the zygote died"
    assert _zygote(daemon).pid != first.pid


def test_a_worker_killed_by_the_os_mid_run_is_a_crash_with_its_signal(daemon, conv, tmp_path):
    argv, fifo, tag = spawn_marker(tmp_path, "victim")
    with daemon.client() as client:
        client.send_user_message(conv, "hi")
        ref = client.generate_assistant_reply(conv, backend_opts={"spawn": argv, "delay_ms": 60_000})
        wait_for_marker(fifo)
        worker = worker_of(tag)
        os.kill(worker, signal.SIGKILL)
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        assert raised.value.message == "generation worker crashed"
        assert raised.value.details["signal"] == signal.SIGKILL
        wait_for_group_gone(worker, timeout_s=10)
        assert [m.role for m in client.conversation(conv).state.messages] == ["user"]


def test_ipc_socket_is_private(daemon):
    path = Path(daemon.endpoint.removeprefix("ipc://"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_no_daemon_means_daemon_unavailable(tmp_path):
    from genvisor.client import Client

    with Client(f"ipc://{tmp_path}/nobody.sock", timeout_ms=100) as client:
        with pytest.raises(DaemonUnavailable):
            client.ping()


async def test_runs_starting_at_once_wait_their_turn_to_ask_the_zygote_for_a_worker():
    """With the zygote's control buffer full (it forks one worker at a time), spawn
    requests queue for the socket instead of crashing the pool (BusyResourceError)."""
    import socket

    import msgspec
    import trio

    from genvisor.daemon.server import WORKER_TARGET
    from genvisor.modes.llm import BackendConfig, LLMRequest, RunSpec
    from genvisor.supervisor.pool import WorkerPool
    from genvisor.supervisor.runs import Completed, Supervisor
    from genvisor.types import ContextMessage

    spec = msgspec.msgpack.encode(RunSpec(
        ref="gen_t", run_id="run_t", conversation_id="c", mode="coding", request_id="q",
        request=LLMRequest([ContextMessage("user", "x")], BackendConfig("scripted", "scripted")),
    ))
    pool = WorkerPool(target=WORKER_TARGET, spares=0)
    supervisor = Supervisor(pool, cancel_grace_s=2.0, term_grace_s=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        pool._zygote.control.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the kernel's minimum: full at once
        handles = [supervisor.start_run(spec, on_progress=lambda _event: None, deadline=None) for _ in range(40)]
        outcomes = [await handle.wait() for handle in handles]
        for handle in handles:
            await handle.cleaned_up.wait()
        nursery.cancel_scope.cancel()
    assert all(isinstance(outcome, Completed) for outcome in outcomes), outcomes


async def test_runs_waiting_for_a_worker_get_one_in_arrival_order():
    """A new worker goes to the run waiting longest: with waiters woken to race for it,
    newcomers kept winning and, under 32 clients, some runs waited seconds."""
    import trio
    import trio.testing

    from genvisor.daemon.server import WORKER_TARGET
    from genvisor.supervisor.pool import WorkerPool

    pool = WorkerPool(target=WORKER_TARGET, spares=0)
    served: list[int] = []
    workers = []
    async with trio.open_nursery() as nursery:
        await nursery.start(pool.run)

        async def acquire(i: int) -> None:
            workers.append(await pool.acquire())
            served.append(i)

        async with trio.open_nursery() as waiting:
            for i in range(6):
                waiting.start_soon(acquire, i)
                await trio.testing.wait_all_tasks_blocked()  # i is queued before i + 1 arrives
        for worker in workers:
            await worker.channel.aclose()  # the worker exits: its run will never come
        nursery.cancel_scope.cancel()
    # Two spawns run at once, so two waiters can be handed their workers in one tick;
    # Trio then wakes them in an order it randomizes on purpose. FIFO hand-off means
    # no waiter is ever overtaken by more than that.
    assert sorted(served) == list(range(6))
    assert all(abs(position - i) <= 1 for position, i in enumerate(served)), served
