"""The fresh-process peers: the same trivial job, a new process for every job.

Each peer is a context manager yielding `call(text) -> text`, safe to use from many
threads at once, backed by a pool of `workers` processes that each run one job and
are replaced. This module imports nothing heavy at the top: spawned children import
it to find `job`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import threading
from collections.abc import Callable, Iterator

Call = Callable[[str], str]


def job(text: str) -> str:
    return text


def retire() -> bool:
    """trio-parallel's retire hook: every worker runs exactly one job."""
    return True


@contextlib.contextmanager
def ppe(method: str, workers: int) -> Iterator[Call]:
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        # As the daemon's zygote: the worker's libraries imported once, up front.
        context.set_forkserver_preload(["bench.peers", "trio", "zmq", "msgspec"])
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, max_tasks_per_child=1) as pool:
        yield lambda text: pool.submit(job, text).result()


@contextlib.contextmanager
def mp_pool_fork(workers: int) -> Iterator[Call]:
    with multiprocessing.get_context("fork").Pool(workers, maxtasksperchild=1) as pool:
        yield lambda text: pool.apply(job, (text,))


@contextlib.contextmanager
def trio_parallel_peer(workers: int, worker_type: str = "spawn") -> Iterator[Call]:
    """trio-parallel drives its workers from a Trio loop; this runs one in a thread and
    lets any thread hand it a job."""
    import trio
    import trio_parallel

    ready = threading.Event()
    stop: list[Callable[[], None]] = []
    box: dict[str, object] = {}

    async def serve() -> None:
        kind = trio_parallel.WorkerType(worker_type)
        async with trio_parallel.open_worker_context(retire=retire, worker_type=kind) as ctx:
            limiter = trio.CapacityLimiter(workers)
            box["run"] = lambda text: ctx.run_sync(job, text, limiter=limiter)
            box["token"] = trio.lowlevel.current_trio_token()
            done = trio.Event()
            stop.append(done.set)
            ready.set()
            await done.wait()

    thread = threading.Thread(target=trio.run, args=(serve,), daemon=True)
    thread.start()
    ready.wait()
    run, token = box["run"], box["token"]
    try:
        yield lambda text: trio.from_thread.run(run, text, trio_token=token)  # type: ignore[arg-type]
    finally:
        trio.from_thread.run_sync(stop[0], trio_token=token)  # type: ignore[arg-type]
        thread.join()


# name → (factory(workers) -> context manager, how slow: samples are scaled by this)
LATENCY_PEERS: dict[str, tuple[Callable[[int], contextlib.AbstractContextManager[Call]], int]] = {
    "ProcessPoolExecutor spawn, max_tasks_per_child=1": (lambda w: ppe("spawn", w), 10),
    "ProcessPoolExecutor forkserver, max_tasks_per_child=1, preloaded": (lambda w: ppe("forkserver", w), 1),
    "multiprocessing.Pool fork, maxtasksperchild=1": (mp_pool_fork, 1),
    "trio-parallel spawn, retire after 1 job": (lambda w: trio_parallel_peer(w, "spawn"), 10),
    "trio-parallel fork, retire after 1 job": (lambda w: trio_parallel_peer(w, "fork"), 1),
}

# The fast peers are the ones worth a throughput curve (spawn peers manage ≈15 jobs/s).
THROUGHPUT_PEERS = [
    "ProcessPoolExecutor forkserver, max_tasks_per_child=1, preloaded",
    "multiprocessing.Pool fork, maxtasksperchild=1",
    "trio-parallel fork, retire after 1 job",
]
