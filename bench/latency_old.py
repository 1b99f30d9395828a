"""Generation and cancel latency of genvisor, side by side with fresh-process peers.

Prints one table from one run (absolute times on a shared VM drift; compare the
ratios). Every generation gets a fresh worker process, as does every peer job.

    python bench/latency.py [--n 300]

Rows:
  genvisor send_and_generate   client → daemon → fresh worker → commit → reply
  PPE forkserver (preloaded)   ProcessPoolExecutor(max_tasks_per_child=1), trio/zmq/msgspec preloaded
  mp.Pool fork                 multiprocessing.Pool(maxtasksperchild=1)
  genvisor cancel → reaped     Supervisor: cancel() → worker reaped and its group verified empty
  mp.Process kill → reaped     fork a process running a job, SIGKILL it, join
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import trio

from genvisor.client import Client
from genvisor.errors import DaemonUnavailable


def job(text: str) -> str:
    return text


def long_job() -> None:
    time.sleep(3600)


def summarize(name: str, samples_ms: list[float]) -> dict:
    ordered = sorted(samples_ms)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"name": name, "n": len(ordered), "p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": ordered[-1], "mean": statistics.fmean(ordered)}


def start_daemon(directory: Path) -> tuple[subprocess.Popen, str]:
    endpoint = f"ipc://{directory}/run/genvisor.sock"
    log = open(directory / "daemon.log", "wb")
    env_log = {"GENVISOR_LOG_LEVEL": "WARNING"}
    import os

    process = subprocess.Popen([sys.executable, "-m", "genvisor", "serve", "--endpoint", endpoint], stdout=log, stderr=log, env={**os.environ, **env_log})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with Client(endpoint, timeout_ms=250) as client:
            try:
                client.ping()
                return process, endpoint
            except DaemonUnavailable:
                continue
    raise SystemExit("daemon did not start")


def bench_genvisor(endpoint: str, n: int) -> list[float]:
    samples = []
    with Client(endpoint) as client:
        for i in range(20):  # warm-up: spares, caches
            client.send_and_generate("bench-warm", f"w{i}")
        for i in range(n):
            start = time.perf_counter()
            _, result = client.send_and_generate(f"bench-{i % 50}", "hello")
            samples.append((time.perf_counter() - start) * 1000)
            assert result.text == "hello"
    return samples


def bench_executor(make, n: int) -> list[float]:
    samples = []
    with make() as pool:
        for _ in range(10):
            pool.submit(job, "w").result()
        for _ in range(n):
            start = time.perf_counter()
            assert pool.submit(job, "hello").result() == "hello"
            samples.append((time.perf_counter() - start) * 1000)
    return samples


def bench_mp_pool(n: int) -> list[float]:
    samples = []
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        for _ in range(10):
            pool.apply(job, ("w",))
        for _ in range(n):
            start = time.perf_counter()
            assert pool.apply(job, ("hello",)) == "hello"
            samples.append((time.perf_counter() - start) * 1000)
    return samples


def bench_genvisor_cancel(n: int) -> tuple[list[float], list[float], int]:
    """cancel() → worker reaped, and → group verified empty, through the daemon's Supervisor."""
    from genvisor.modes.llm import BackendConfig, LLMRequest, RunSpec
    from genvisor.supervisor.pool import WorkerPool
    from genvisor.supervisor.runs import Supervisor
    from genvisor.types import ContextMessage

    spec = msgspec.msgpack.encode(
        RunSpec(
            ref="gen_b", run_id="run_b", conversation_id="c", mode="coding", request_id="q", events=True,
            request=LLMRequest([ContextMessage("user", "x")], BackendConfig("scripted", "scripted"), backend_opts={"delay_ms": 60_000}),
        )
    )
    reaped: list[float] = []
    verified: list[float] = []
    failures = 0

    async def main() -> None:
        nonlocal failures
        supervisor = Supervisor(WorkerPool(target="genvisor.modes.runtime:execute", spares=2), cancel_grace_s=2.0, term_grace_s=1.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            for i in range(n + 10):
                running = trio.Event()
                handle = supervisor.start_run(spec, on_progress=lambda _e: running.set(), deadline=None)
                await running.wait()  # the worker is inside its run
                start = time.perf_counter()
                handle.cancel("bench")
                await handle.cleaned_up.wait()
                done = (time.perf_counter() - start) * 1000
                if i >= 10:
                    reaped.append(handle.cleanup.reaped_after_ms)
                    verified.append(done)
                    failures += not handle.cleanup.verified
            nursery.cancel_scope.cancel()

    trio.run(main)
    return reaped, verified, failures


def bench_mp_kill(n: int) -> list[float]:
    ctx = multiprocessing.get_context("fork")
    samples = []
    for _ in range(n):
        process = ctx.Process(target=long_job)
        process.start()
        start = time.perf_counter()
        process.kill()
        process.join()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    n = args.n

    forkserver = multiprocessing.get_context("forkserver")
    forkserver.set_forkserver_preload(["trio", "zmq", "msgspec"])

    rows = []
    with tempfile.TemporaryDirectory(prefix="genvisor-bench-") as tmp:
        daemon, endpoint = start_daemon(Path(tmp))
        try:
            # Interleave halves so drift on a shared box hits every row alike.
            g1 = bench_genvisor(endpoint, n // 2)
            p1 = bench_executor(lambda: concurrent.futures.ProcessPoolExecutor(1, mp_context=forkserver, max_tasks_per_child=1), n // 2)
            m1 = bench_mp_pool(n // 2)
            g2 = bench_genvisor(endpoint, n - n // 2)
            p2 = bench_executor(lambda: concurrent.futures.ProcessPoolExecutor(1, mp_context=forkserver, max_tasks_per_child=1), n - n // 2)
            m2 = bench_mp_pool(n - n // 2)
        finally:
            daemon.terminate()
            daemon.wait(60)
    rows.append(summarize("genvisor send_and_generate", g1 + g2))
    rows.append(summarize("PPE forkserver (preloaded)", p1 + p2))
    rows.append(summarize("mp.Pool fork", m1 + m2))
    reaped, verified, failures = bench_genvisor_cancel(n)
    rows.append(summarize("genvisor cancel → reaped", reaped))
    rows.append(summarize("genvisor cancel → verified", verified))
    rows.append(summarize("mp.Process kill → reaped", bench_mp_kill(n)))

    base = {"generation": rows[0]["p50"], "cancel": rows[3]["p50"]}
    print(f"\n{'scenario':<30} {'n':>5} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}  p50 ratio to genvisor")
    for row in rows:
        ref = base["generation"] if "cancel" not in row["name"] and "kill" not in row["name"] else base["cancel"]
        print(f"{row['name']:<30} {row['n']:>5} {row['p50']:>8.2f} {row['p90']:>8.2f} {row['p99']:>8.2f} {row['max']:>8.2f}  {row['p50'] / ref:>6.2f}x")
    print(f"\ncleanup verification failures: {failures}")
    print("targets: generation p50 <= 3 ms; cancel -> reaped p99 <= 5 ms")


if __name__ == "__main__":
    main()
