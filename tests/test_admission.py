"""Admission and backpressure: a cap on workers, a bounded queue, `Overloaded` beyond it."""

from __future__ import annotations

import pytest
import trio

from conftest import TEST_CONFIG, Daemon
from genvisor.daemon.admission import Admission
from genvisor.errors import GenerationCanceled, NotFound, Overloaded

# ---- the admission itself ---------------------------------------------------------------


async def test_slots_are_granted_in_order_and_refused_beyond_the_queue():
    admission = Admission(max_active=2, max_queued=2)
    first, second = admission.admit(), admission.admit()
    third, fourth = admission.admit(), admission.admit()
    with pytest.raises(Overloaded):
        admission.admit()
    assert (admission.active, admission.queued) == (2, 2)
    order: list[str] = []

    async def run(name: str, slot) -> None:
        await slot.acquire()
        order.append(name)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "fourth", fourth)
        nursery.start_soon(run, "third", third)
        await trio.testing.wait_all_tasks_blocked()
        assert order == []
        first.release()
        await trio.testing.wait_all_tasks_blocked()
        assert order == ["third"]  # FIFO, whatever order the waiters started in
        first.release()  # a second release changes nothing
        second.release()
    assert order == ["third", "fourth"]
    assert (admission.active, admission.queued) == (2, 0)
    third.release()
    fourth.release()
    assert (admission.active, admission.queued) == (0, 0)


async def test_a_slot_cancelled_in_the_queue_leaves_it():
    admission = Admission(max_active=1, max_queued=1)
    running, waiting = admission.admit(), admission.admit()
    with trio.move_on_after(0.01) as scope:
        with waiting:
            await waiting.acquire()
    assert scope.cancelled_caught
    assert (admission.active, admission.queued) == (1, 0)
    admission.admit().release()  # there is room in the queue again
    running.release()
    assert (admission.active, admission.queued) == (0, 0)


# ---- through a daemon ---------------------------------------------------------------------

SMALL = TEST_CONFIG + "\n[admission]\nmax_active = 1\nmax_queued = 1\n"


@pytest.fixture
def small_daemon(tmp_path):
    d = Daemon(tmp_path, config=SMALL).start()
    yield d
    assert d.stop() == 0, d.log()


def test_when_full_overloaded_is_answered_at_once_and_nothing_is_recorded(small_daemon):
    with small_daemon.client() as client:
        for conv in "abc":
            client.send_user_message(conv, "hello")
        running = client.generate_assistant_reply("a", backend_opts={"delay_ms": 60_000})
        queued = client.generate_assistant_reply("b")
        status = client.status()
        assert (status.active_runs, status.queued_runs) == (1, 1)

        with pytest.raises(Overloaded):
            client.generate_assistant_reply("x")
        with pytest.raises(NotFound):
            client.conversation("x")  # not even created
        entries = client.conversation_thread_entries("c")
        with pytest.raises(Overloaded):
            client.generate_assistant_reply("c")
        assert client.conversation_thread_entries("c") == entries
        client.send_user_message("d", "first")
        entries = client.conversation_thread_entries("d")
        with pytest.raises(Overloaded):
            client.send_and_generate("d", "second")
        assert client.conversation_thread_entries("d") == entries  # the user message was not recorded

        status = client.status()
        assert status.admissions_rejected == 3
        assert (status.active_runs, status.queued_runs) == (1, 1)

        # The admitted runs finish: the queued one starts when the running one ends.
        client.cancel_generation("a", "make room")
        assert client.await_generation("b", queued).status == "completed"
        with pytest.raises(GenerationCanceled):
            client.await_generation("a", running)
        assert client.status().queued_runs == 0


def test_a_run_canceled_while_queued_never_starts(small_daemon):
    with small_daemon.client() as client:
        for conv in "abc":
            client.send_user_message(conv, "hello")
        client.generate_assistant_reply("a", backend_opts={"delay_ms": 60_000})
        queued = client.generate_assistant_reply("b")
        client.cancel_generation("b", "not any more")
        with pytest.raises(GenerationCanceled) as raised:
            client.await_generation("b", queued)
        assert raised.value.reason == "not any more"
        status = client.status()
        assert (status.active_runs, status.queued_runs, status.runs_started) == (1, 0, 2)
        # The slot it held in the queue is free again.
        client.generate_assistant_reply("c")
        client.stop_conversation("a")
        client.stop_conversation("c")
