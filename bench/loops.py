"""Closed-loop load: `clients` callers, each starting its next call when the last one
returns, for a fixed time; the same driver for genvisor and the peers."""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections.abc import Callable

import msgspec

from genvisor.client import Client

OpenCaller = Callable[[int], contextlib.AbstractContextManager[Callable[[], None]]]


class LoopResult(msgspec.Struct, frozen=True):
    clients: int
    completed: int
    seconds: float
    errors: int
    latencies_ms: list[float]

    @property
    def per_s(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0


def closed_loop(open_caller: OpenCaller, clients: int, seconds: float, warmup: int = 2) -> LoopResult:
    """Each thread opens its caller, warms it, waits for all, then calls until time is up.
    A client that fails before the loop (opening, warming) stops them all: raised here."""
    begin_stop = [0.0, 0.0]

    def go() -> None:  # runs once all are warm, before any is released
        begin_stop[0] = time.perf_counter()
        begin_stop[1] = begin_stop[0] + seconds

    barrier = threading.Barrier(clients + 1, action=go)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    failed: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with open_caller(i) as call:
                for _ in range(warmup):
                    call()
                barrier.wait()
                mine = latencies[i]
                while True:
                    start = time.perf_counter()
                    if start >= begin_stop[1]:
                        return
                    try:
                        call()
                    except Exception:  # noqa: BLE001 — counted, the loop goes on
                        errors[i] += 1
                        continue
                    mine.append((time.perf_counter() - start) * 1000)
        except threading.BrokenBarrierError:
            pass  # another client failed before the loop
        except BaseException as exc:  # noqa: BLE001 — raised by the caller, below
            failed.append(exc)
            barrier.abort()  # nobody waits for this one

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    if failed:
        raise RuntimeError(f"{len(failed)} of {clients} clients failed: {failed[0]!r}") from failed[0]
    elapsed = time.perf_counter() - begin_stop[0]
    flat = [x for per in latencies for x in per]
    return LoopResult(clients, len(flat), elapsed, sum(errors), flat)


def genvisor_caller(endpoint: str, prefix: str, rotate: int = 1) -> OpenCaller:
    """Client `i` generates in its own conversations (one active run per conversation),
    taking `rotate` of them in turn: a soak spreads its turns, as a conversation's
    history is in every reply and makes its turns slower as it grows."""

    @contextlib.contextmanager
    def open_caller(i: int):
        with Client(endpoint, timeout_ms=120_000) as client:
            turns = itertools.count()

            def call() -> None:
                client.send_and_generate(f"{prefix}-{i}-{next(turns) % rotate}", "hello")

            yield call

    return open_caller


def peer_caller(call: Callable[[str], str]) -> OpenCaller:
    @contextlib.contextmanager
    def open_caller(i: int):
        yield lambda: call("hello")

    return open_caller
