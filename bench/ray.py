"""Scenario 8 — the Ray executor (`[executor] kind = "ray"`), next to the local executor
and to Ray's own fresh-process baseline, all in one run on one two-node cluster.

The cluster is Ray's cluster_utils on this machine: a head and one more node, each a
GCS/raylet of its own (num_cpus 2). Three paths run the same trivial job (echo the
user's text), rounds alternating between them (their order turning each round) so
that drift on a shared machine hits them alike:

- local: a daemon with the local executor (a fresh worker per generation, this machine);
- ray: a daemon with the Ray executor on the cluster (a fresh worker per generation,
  in the zygote of the node's agent; placement least loaded, ties in turn);
- plain Ray task: `@ray.remote(max_calls=1, num_cpus=0)` echoing its argument,
  submitted from a driver in this process connected to the same cluster — a fresh
  Ray worker process per task, Ray's own way of running a job in a new process.

Latency is one call at a time (`send_and_generate`, `ray.get(echo.remote(...))`);
throughput a closed loop of 8 client threads, each in its own conversation.

Cancel → verified gone on a remote node: on the Ray daemon, runs whose worker has
spawned a tool subprocess (scripted `spawn`, `delay_ms` 60 s), then
`cancel_generation`. Per cancel, two figures:

- client-side: from the cancel call to the last process of the run's group (the worker
  leads its group: os.getpgid(tool)) exited, seen on pidfds opened before the cancel;
- the daemon's own: `reaped_ms=` of its `run.finished` log line (from its decision to
  end the run to the node's verified cleanup record arriving), with `node=`.

Only runs on the node that is not the head count as remote; the head's are shown apart.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import psutil

from bench.harness import Daemon, WaitTimedOut, daemon_config, living_in_group, readable, wait_for_exit, wait_until
from bench.latency import generations
from bench.loops import OpenCaller, closed_loop, genvisor_caller, peer_caller
from bench.report import Result, Table, figure
from bench.stats import fmt, fmt_ratio, ratio, summarize
from genvisor.errors import GenerationCanceled, LLMError

LOCAL = "genvisor, local executor"
RAY = "genvisor, Ray executor (2 nodes)"
TASK = "plain Ray task, max_calls=1"
PATHS = [LOCAL, RAY, TASK]
CLIENTS = 8
NODE_CPUS = 2
CANCEL_GOAL_MS = 50.0


class RayDaemon(Daemon):
    """A bench daemon whose runs go to a Ray cluster: ready once every node's agent is
    up with its spares (its workers are the nodes', not its zygote's), and stopped only
    once no process that its agents started is left on any node of this machine."""

    def __init__(self, directory: Path, config: str, *, nodes: int) -> None:
        super().__init__(directory, config, log_level="INFO")
        self.nodes = nodes

    @property
    def instance(self) -> str:
        return str((self.directory / "state").resolve())

    def wait_for_spares(self, timeout_s: float = 120.0) -> None:
        wanted = _spares(self.config_path)

        def ready() -> Any:
            with self.client() as client:
                status = client.status()
            nodes = status.nodes if status.cluster == "up" else []
            return len(nodes) == self.nodes and all(n.spare_workers >= wanted for n in nodes)

        wait_until(ready, timeout_s, lambda: f"{self.nodes} nodes up, each with {wanted} spares:\n{self.log()[-3000:]}",
                   interval_s=0.02)

    def marked(self) -> list[int]:
        from genvisor.supervisor import linux

        return [p for p in psutil.pids() if (linux.environ_value(p, linux.INSTANCE_ENV) or "").startswith(self.instance + "@")]

    def stop(self) -> int:
        code = super().stop()
        wait_until(lambda: not self.marked(), 60, lambda: f"the nodes' processes of this daemon gone: {self.marked()}")
        return code


def _spares(config: Path) -> int:
    import tomllib

    return tomllib.loads(config.read_text()).get("workers", {}).get("spares", 4)


def _echo_task(ray: Any) -> Any:
    """The plain Ray task. Made here, not at module level, so that cloudpickle ships it
    by value: a Ray worker need not import this bench."""

    def echo(text: str) -> str:
        return text

    return ray.remote(max_calls=1, num_cpus=0)(echo)


# ---- latency and throughput ---------------------------------------------------------


def _task_samples(call: Callable[[str], str], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        assert call("hello") == "hello"
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def _daemon_samples(daemon: Daemon, n: int, prefix: str) -> list[float]:
    return [(b - a) * 1000 for a, b in generations(daemon, n, prefix)]


def _first_turns(daemon: Daemon, prefix: str) -> None:
    """One turn in each closed-loop client's conversation, one after the other. A new
    conversation's first run on the Ray executor pins its workspace to a node, and pins
    written at once by concurrent first runs race on one temp file (run Broken with
    FileNotFoundError): made here, one at a time, the loops measure runs, not that."""
    with daemon.client() as client:
        for i in range(CLIENTS):
            client.send_and_generate(f"{prefix}-{i}-0", "hello")


def _guarded(open_caller: OpenCaller, warmup: int, errors: list[str]) -> OpenCaller:
    """`open_caller` whose `warmup` first calls' failures are noted in `errors` instead of
    ending the client's thread (closed_loop counts failures only once the clock runs;
    a thread that dies in its warm-up leaves the others waiting for it for ever)."""

    @contextlib.contextmanager
    def open_guarded(i: int):
        with open_caller(i) as call:
            calls = itertools.count()

            def guarded() -> None:
                if next(calls) >= warmup:
                    return call()
                try:
                    return call()
                except Exception as exc:  # noqa: BLE001 — noted, the loop goes on
                    errors.append(f"{type(exc).__name__}: {exc}")

            yield guarded

    return open_guarded


# ---- cancels ------------------------------------------------------------------------


class _Exits:
    """The exits of `pids`, watched on pidfds opened now (before the cancel: no exit is
    missed) by a thread that stamps each as it comes."""

    def __init__(self, pids: list[int], timeout_s: float) -> None:
        self._fds: list[int] = []
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                self._fds.append(os.pidfd_open(pid))
        self._timeout_s = timeout_s
        self._last = time.perf_counter()
        self._alive = len(self._fds)
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        poller = select.poll()
        for fd in self._fds:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + self._timeout_s
        while self._alive and (left := deadline - time.monotonic()) > 0:
            for fd, _ in poller.poll(int(left * 1000) + 1):
                self._last = time.perf_counter()
                poller.unregister(fd)
                self._alive -= 1

    def last(self) -> float:
        """perf_counter() when the last of them exited; WaitTimedOut if one is alive."""
        self._thread.join(self._timeout_s + 5)
        for fd in self._fds:
            os.close(fd)
        if self._alive:
            raise WaitTimedOut(f"{self._alive} process(es) of the run's group still alive {self._timeout_s:g} s after the cancel")
        return self._last


class _FinishedLines:
    """The daemon's `run.finished` events (JSON log lines), by ref, read on from where
    the last look ended."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self._rest = b""
        self.by_ref: dict[str, dict[str, Any]] = {}

    def get(self, ref: str) -> dict[str, Any] | None:
        if ref not in self.by_ref:
            with open(self._path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
            self._offset += len(data)
            *lines, self._rest = (self._rest + data).split(b"\n")
            for line in lines:
                if b'"run.finished"' not in line:
                    continue
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("event") == "run.finished" and "ref" in entry:
                        self.by_ref[entry["ref"]] = entry
        return self.by_ref.get(ref)


class Cancels(msgspec.Struct):
    gone_ms: dict[str, list[float]] = {}  # node → cancel sent → the run's group gone (client-side)
    reaped_ms: dict[str, list[float]] = {}  # node → the daemon's reaped_ms
    not_canceled: int = 0  # the await gave something else than GenerationCanceled
    survivors: int = 0  # a process of the run's group or session alive afterwards, or cleanup not "verified"
    misplaced: int = 0  # the line's node= is not the node whose raylet the tool descends from


def _raylets(cluster: Any) -> dict[int, str]:
    return {node.all_processes["raylet"][0].process.pid: node.node_id for node in cluster.list_all_nodes()}


def _node_of(pid: int, raylets: dict[int, str]) -> str | None:
    with contextlib.suppress(psutil.NoSuchProcess):
        for ancestor in psutil.Process(pid).parents():
            if ancestor.pid in raylets:
                return raylets[ancestor.pid]
    return None


def cancel_runs(daemon: RayDaemon, cluster: Any, scratch: Path, n: int, warm: int) -> Cancels:
    case = Cancels()
    lines = _FinishedLines(daemon.log_path)
    raylets = _raylets(cluster)
    with daemon.client() as client:
        for i in range(n + warm):
            conv, fifo = f"rc-{i}", scratch / f"rc-{i}.fifo"
            os.mkfifo(fifo)
            # The tool says its pid on the FIFO, then becomes `sleep` (the same pid).
            argv = ["sh", "-c", f"echo $$ > {fifo}; exec sleep {600_000 + i}"]
            reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            try:
                client.send_user_message(conv, "x")
                ref = client.generate_assistant_reply(conv, backend_opts={"spawn": argv, "delay_ms": 60_000})
                if not readable(reader, 30):
                    raise WaitTimedOut(f"run {i}'s tool subprocess did not start within 30 s")
                tool = int(os.read(reader, 64).split()[0])
            finally:
                os.close(reader)
            leader = os.getpgid(tool)  # the worker: it leads its group, the tool is in it
            group = living_in_group(leader)
            seen_on = _node_of(tool, raylets)
            exits = _Exits(group, timeout_s=30)
            begin = time.perf_counter()
            client.cancel_generation(conv, "bench")
            try:
                client.await_generation(conv, ref)
                canceled = False
            except GenerationCanceled:
                canceled = True
            except LLMError:  # ended otherwise: counted, the run's processes are still timed
                canceled = False
            gone_at = exits.last()
            line = wait_until(lambda ref=ref: lines.get(ref), 15, f"the run.finished line of {ref} in {daemon.log_path}")
            if i < warm:
                continue
            node = str(line.get("node"))
            case.gone_ms.setdefault(node, []).append((gone_at - begin) * 1000)
            if "reaped_ms" in line:
                case.reaped_ms.setdefault(node, []).append(float(line["reaped_ms"]))
            case.not_canceled += not canceled
            case.survivors += bool(living_in_group(leader)) or line.get("cleanup") != "verified"
            case.misplaced += seen_on != node
    return case


# ---- the run ------------------------------------------------------------------------


def run(ctx) -> Result:
    import ray
    from ray.cluster_utils import Cluster

    rounds = ctx.n(full=4, quick=2)
    n_daemon = ctx.n(full=400, quick=60)  # generations per daemon, over all rounds
    n_task = ctx.n(full=60, quick=12)  # plain Ray tasks, over all rounds (each starts a Ray worker)
    tp_rounds = ctx.n(full=2, quick=1)
    # Seconds per closed loop: a plain Ray task takes seconds under 8 clients, so its loop
    # runs longer, to hold a few calls of each client (the rate is completed / elapsed).
    tp_seconds = {LOCAL: ctx.n(full=3, quick=2), RAY: ctx.n(full=3, quick=2), TASK: ctx.n(full=8, quick=4)}
    n_cancel = ctx.n(full=120, quick=24)  # about half land on the remote node

    warm_errors: list[str] = []
    latency: dict[str, list[float]] = {p: [] for p in PATHS}
    loops: dict[str, list[Any]] = {p: [] for p in PATHS}
    family: list[int] = []
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # an earlier scenario's (a forkserver)
    # The daemons log their run.finished lines as JSON: the cancels' figures are read there.
    config = 'log_format = "json"\n' + daemon_config(spares=4, max_active=64, max_queued=256)
    with contextlib.ExitStack() as stack:
        # Stopped in the reverse order, whatever fails: the driver, the daemons, the cluster.
        cluster = Cluster()
        stack.callback(cluster.shutdown)
        cluster.add_node(num_cpus=NODE_CPUS, include_dashboard=False)
        cluster.add_node(num_cpus=NODE_CPUS)
        cluster.wait_for_nodes()
        head = cluster.head_node.node_id
        local = Daemon(ctx.dir("ray-local"), config, log_level="INFO")
        stack.callback(_stop, local)
        local.start()
        remote = RayDaemon(ctx.dir("ray-daemon"), config + f'[executor]\nkind = "ray"\naddress = "{cluster.address}"\n', nodes=2)
        stack.callback(_stop, remote)
        remote.start()
        ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.ERROR)
        stack.callback(ray.shutdown)
        echo = _echo_task(ray)

        def task(text: str) -> str:
            return ray.get(echo.remote(text))

        # Warm each path: the first generations, the function's export and first workers.
        _daemon_samples(local, 20, "warm")
        _daemon_samples(remote, 20, "warm")
        _task_samples(task, 3)

        steps: dict[str, Callable[[int], list[float]]] = {
            LOCAL: lambda k: _daemon_samples(local, k, "lat-local"),
            RAY: lambda k: _daemon_samples(remote, k, "lat-ray"),
            TASK: lambda k: _task_samples(task, k),
        }
        per_round = {LOCAL: n_daemon // rounds, RAY: n_daemon // rounds, TASK: max(3, n_task // rounds)}
        for r in range(rounds):
            for path in PATHS[r % 3:] + PATHS[:r % 3]:
                local.wait_idle()
                remote.wait_idle()
                latency[path] += steps[path](per_round[path])

        daemons = {LOCAL: local, RAY: remote}
        for r in range(tp_rounds):
            for path in PATHS[r % 3:] + PATHS[:r % 3]:
                local.wait_idle()
                remote.wait_idle()
                if path in daemons:
                    # Each client's conversation made (and, on the cluster, pinned to its node)
                    # one at a time first: see _first_turns.
                    caller, warmup = genvisor_caller(daemons[path].endpoint, f"tp-{r}"), 2
                    _first_turns(daemons[path], f"tp-{r}")
                else:
                    caller, warmup = peer_caller(task), 1  # a Ray worker started per client
                loops[path].append(closed_loop(_guarded(caller, warmup, warm_errors), CLIENTS, tp_seconds[path], warmup=warmup))

        remote.wait_idle()
        cancels = cancel_runs(remote, cluster, ctx.dir("ray-cancel"), n_cancel, warm=2)
        # Everything this scenario started, to see it gone once the stack has stopped it.
        family = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before]
    leftovers = _reap_leftovers(family)
    return _result(ctx, head, latency, loops, cancels, leftovers, warm_errors,
                   sizes={"rounds": rounds, "throughput_s": tp_seconds[RAY], "task_throughput_s": tp_seconds[TASK],
                          "throughput_rounds": tp_rounds})


def _stop(daemon: Daemon) -> None:
    if daemon.process is not None:
        daemon.stop()


def _reap_leftovers(family: list[int]) -> list[int]:
    """The processes this scenario started (daemons, workers, agents, Ray's) still
    alive 30 s after the teardown: each killed, by pid, and counted."""
    alive = []
    for pid in wait_for_exit(family, 30):
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
                os.kill(pid, signal.SIGKILL)
    return alive


def _result(ctx, head: str, latency: dict[str, list[float]], loops: dict[str, list[Any]], cancels: Cancels,
            leftovers: list[int], warm_errors: list[str], sizes: dict[str, int]) -> Result:
    lat = {p: summarize(s) for p, s in latency.items()}
    task_lat = lat[TASK]
    rows = [[p, str(s.n), fmt(s.p50), fmt(s.p90), fmt(s.p99), fmt(s.max), fmt_ratio(ratio(s.p50, task_lat.p50)),
             fmt_ratio(ratio(s.p99, task_lat.p99))] for p, s in lat.items()]

    completed = {p: sum(loop.completed for loop in ls) for p, ls in loops.items()}
    seconds = {p: sum(loop.seconds for loop in ls) for p, ls in loops.items()}
    rate = {p: ratio(completed[p], seconds[p]) for p in PATHS}
    tp_lat = {p: summarize([x for loop in ls for x in loop.latencies_ms]) for p, ls in loops.items()}
    errors = {p: sum(loop.errors for loop in ls) for p, ls in loops.items()}
    tp_rows = [[p, fmt(rate[p], 1), str(completed[p]), fmt(tp_lat[p].p50, 1), fmt(tp_lat[p].p99, 1), str(errors[p]),
                fmt_ratio(ratio(rate[p], rate[TASK])), fmt_ratio(ratio(rate[p], rate[LOCAL]))] for p in PATHS]

    remote_nodes = [node for node in cancels.gone_ms if node != head]
    gone_remote = summarize([x for node in remote_nodes for x in cancels.gone_ms[node]])
    reaped_remote = summarize([x for node in remote_nodes for x in cancels.reaped_ms.get(node, [])])
    gone_head, reaped_head = summarize(cancels.gone_ms.get(head, [])), summarize(cancels.reaped_ms.get(head, []))
    cancel_rows = [
        [label, str(g.n), fmt(g.p50), fmt(g.p99), fmt(g.max), fmt(d.p50), fmt(d.p99), fmt(d.max)]
        for label, g, d in (("remote node (not the head)", gone_remote, reaped_remote), ("head node", gone_head, reaped_head))
    ]
    notes = [
        f"Latency: {sizes['rounds']} rounds, the three paths in turn (their order rotating each round); "
        f"throughput: {sizes['throughput_rounds']} round(s) per path, {CLIENTS} client threads, "
        f"{sizes['throughput_s']} s a loop ({sizes['task_throughput_s']} s for the plain Ray task, whose calls take seconds); "
        "each client's conversation had its first turn, one at a time, before the loops.",
        f"Ray executor latency p50 / plain Ray task p50 = {fmt_ratio(ratio(lat[RAY].p50, task_lat.p50))} (goal ≤ 1.5×); "
        f"throughput Ray executor / plain Ray task = {fmt_ratio(ratio(rate[RAY], rate[TASK]))}, "
        f"Ray executor / local = {fmt_ratio(ratio(rate[RAY], rate[LOCAL]))}.",
        f"Cancels: {gone_remote.n} on the remote node, {gone_head.n} on the head; not canceled {cancels.not_canceled}, "
        f"survivors or unverified cleanups {cancels.survivors}, node= not the tool's node {cancels.misplaced}; "
        f"processes left after the teardown {len(leftovers)}.",
    ]
    if warm_errors:
        notes.append(f"{len(warm_errors)} closed-loop warm-up call(s) failed (not in the figures; counted in ray.errors), "
                     f"e.g. {warm_errors[0][:300]}")
    if reaped_remote.n and gone_remote.n and reaped_remote.p50 > gone_remote.max + 1000:
        notes.append(f"The daemon's reaped_ms ({fmt(reaped_remote.p50)} ms p50) is far beyond the client's whole cancel → "
                     f"gone ({fmt(gone_remote.max)} ms max): it is not a duration (two clocks mixed in the daemon?).")
    _plot(ctx.out / "ray.png", latency, cancels, head)
    metrics = {
        "ray.latency.local_p50_ms": lat[LOCAL].p50,
        "ray.latency.ray_p50_ms": lat[RAY].p50,
        "ray.latency.ray_p99_ms": lat[RAY].p99,
        "ray.latency.task_p50_ms": task_lat.p50,
        "ray.latency.task_p99_ms": task_lat.p99,
        "ray.latency.p50_vs_ray_task": ratio(lat[RAY].p50, task_lat.p50),
        "ray.latency.p99_vs_ray_task": ratio(lat[RAY].p99, task_lat.p99),
        "ray.latency.p50_vs_local": ratio(lat[RAY].p50, lat[LOCAL].p50),
        "ray.throughput.local_per_s": rate[LOCAL],
        "ray.throughput.ray_per_s": rate[RAY],
        "ray.throughput.task_per_s": rate[TASK],
        "ray.throughput.ray_vs_ray_task": ratio(rate[RAY], rate[TASK]),
        "ray.throughput.ray_vs_local": ratio(rate[RAY], rate[LOCAL]),
        "ray.errors": float(sum(errors.values()) + len(warm_errors)),
        "ray.cancel.remote_n": float(gone_remote.n),
        "ray.cancel.gone_p50_ms": gone_remote.p50,
        "ray.cancel.gone_p99_ms": gone_remote.p99,
        "ray.cancel.daemon_reaped_p50_ms": reaped_remote.p50,
        "ray.cancel.daemon_reaped_p99_ms": reaped_remote.p99,
        "ray.cancel.not_canceled": float(cancels.not_canceled),
        "ray.cancel.survivors": float(cancels.survivors),
        "ray.leftover_processes": float(len(leftovers)),
    }
    return Result(
        name="ray",
        tables=[
            Table("Generation latency, ms (one call at a time; same cluster, rounds alternating)",
                  ["path", "n", "p50", "p90", "p99", "max", "p50 × plain Ray task", "p99 × plain Ray task"], rows,
                  note="genvisor: `send_and_generate` of a zero-delay scripted turn, a fresh worker per generation. "
                       "Plain Ray task: `ray.get(echo.remote(text))` of `@ray.remote(max_calls=1, num_cpus=0)`, a fresh Ray "
                       "worker process per task, from a driver in the bench process (Ray's default placement)."),
            Table(f"Closed-loop throughput, {CLIENTS} client threads (each its own conversation)",
                  ["path", "per s", "completed", "p50 ms", "p99 ms", "errors", "× plain Ray task", "× local"], tp_rows),
            Table("Cancel → verified gone, a run with a tool subprocess on the Ray executor, ms",
                  ["node", "n", "client: group gone p50", "p99", "max", "daemon: reaped_ms p50", "p99", "max"], cancel_rows,
                  note="Client: from the `cancel_generation` call to the last process of the run's group (its worker and the "
                       "tool it spawned) exited, on pidfds opened before the cancel. Daemon: `reaped_ms=` of its run.finished "
                       "line, from its decision to end the run to the node's verified cleanup record arriving; `node=` says "
                       "where it ran. Default graces (2 s + 1 s): the Stop frame ends the worker, the tool is killed with "
                       "its group."),
        ],
        metrics=metrics,
        plots=["ray.png"],
        notes=notes,
        data={"latency": lat, "throughput_per_s": rate, "throughput_latency": tp_lat, "head": head,
              "cancel": {"gone_ms": cancels.gone_ms, "reaped_ms": cancels.reaped_ms}, "leftovers": leftovers},
    )


def _plot(path: Path, latency: dict[str, list[float]], cancels: Cancels, head: str) -> None:
    with figure(path, ncols=2, width=6, height=4) as (left, right):
        for name, values in latency.items():
            ordered = sorted(values)
            left.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post", label=name)
        left.set_xscale("log")
        left.set_xlabel("call → result, ms (log)")
        left.set_ylabel("fraction of calls")
        left.set_title("One trivial job, a fresh process each")
        left.grid(True, which="both", alpha=0.3)
        left.legend(fontsize=7, loc="lower right")
        for label, by_node in (("client: group gone", cancels.gone_ms), ("daemon: reaped_ms", cancels.reaped_ms)):
            values = sorted(x for node, xs in by_node.items() if node != head for x in xs)
            if values:
                right.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post", label=label)
        right.axvline(CANCEL_GOAL_MS, color="grey", linestyle=":", label=f"goal p99 ≤ {CANCEL_GOAL_MS:g} ms")
        right.set_xscale("log")
        right.set_xlabel("cancel → verified gone, ms (log)")
        right.set_title("Cancels on the remote node")
        right.grid(True, which="both", alpha=0.3)
        right.legend(fontsize=7, loc="lower right")


# ---- standalone ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ray", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts (≈1.5 min)")
    parser.add_argument("--out", type=Path, help="where the plot goes (default: a temp dir, removed)")
    args = parser.parse_args(argv)
    from bench.run import standalone

    return standalone("ray", run, quick=args.quick, out=args.out)


if __name__ == "__main__":
    raise SystemExit(main())
