"""The load of the streaming scenario (bench.streaming), generated from processes of
their own so that the generator is not what limits a measurement.

`LoadPool(processes)` starts that many `spawn` processes, kept for the whole scenario;
`pool.run(jobs)` hands one job to each, waits until every process has set up its
clients (connected, conversations holding their user message), then starts them all at
one instant (`time.monotonic()` is the machine's CLOCK_MONOTONIC: one clock for every
process) and collects their reports. Two kinds of job:

* `ScriptedJob`: one `Client` for all the job's streams, one thread: it starts each
  generation at its offset after go (`events=True`, the scripted backend waiting the
  stream's `delay_ms`, then streaming `chunks` `chunk_delay_ms` apart), then reads the
  notifications of all of them off its one socket, in arrival order. Reading is cheap this way (one poll and one decode per event), which is what
  a thousand streams need; what a delta's arrival time means is coarse here (a
  notification read late because another was being handled), so this job reports
  counts per 10 ms bin, not latencies.
* `LatencyJob`: one thread per slot, each with a connection of its own (a genvisor
  `Client`, or the `openai` SDK's client for the direct reads), running its slot's
  streams back to back; every content delta is stamped on arrival. A thread waits only
  on its own stream, so a stamp is late only by scheduling.
"""

from __future__ import annotations

import argparse
import multiprocessing.connection
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

REPO = Path(__file__).resolve().parent.parent
BIN_S = 0.01  # arrival counts are kept per 10 ms


class ScriptedJob(msgspec.Struct, frozen=True):
    endpoint: str
    conversations: list[str]
    chunks: list[str]  # each holds exactly one `separator`: deltas are counted by it
    chunk_delay_ms: int
    offsets_s: list[float] | None = None  # per conversation: when its generation starts after go (None: all at once)
    delays_ms: list[int] | None = None  # per conversation: the scripted delay_ms before its first chunk
    separator: str = "."
    timeout_ms: int = 600_000  # the run's deadline
    read_timeout_s: float = 900.0  # the job gives up on results not in by then


class StreamSummary(msgspec.Struct):
    conversation: str
    ref: str = ""
    first_s: float = 0.0  # monotonic arrival of its first and last delta event
    last_s: float = 0.0
    deltas: int = 0  # model deltas received (separators counted)
    events: int = 0  # delta events received
    complete: bool = False  # the joined delta texts == the result text == the chunks
    error: str | None = None


class ScriptedReport(msgspec.Struct):
    pid: int
    streams: list[StreamSummary]
    delta_bins: dict[int, int]  # int(arrival / BIN_S) → model deltas arrived in that bin
    event_bins: dict[int, int]  # … → delta events
    submitted_s: float = 0.0  # monotonic: all generations started
    finished_s: float = 0.0  # monotonic: the last result in
    cpu_s: float = 0.0  # this process's CPU from go to finished
    other_kinds: dict[str, int] = {}  # events of other kinds (counted, never relied on)


class LatencyJob(msgspec.Struct, frozen=True):
    """Slots of streams read back to back, each slot on a thread and connection of its
    own. `path` "genvisor": generations through the daemon at `endpoint` (the
    conversations hold their user message); "direct": the `openai` SDK against
    `base_url`."""

    path: str  # "genvisor" | "direct"
    slots: list[list[str]]  # per slot, its streams' conversation ids (direct: just names)
    offsets_s: list[float]  # per slot, when its first stream starts after go
    endpoint: str = ""
    base_url: str = ""
    backend: str = "local"
    model: str = "test-model"
    read_timeout_s: float = 120.0


class StreamTrace(msgspec.Struct):
    slot: int
    index: int  # the stream's place in its slot (0: started while the others were ramping up)
    requested_s: float  # monotonic, just before the request went out
    arrivals: list[tuple[str, float]]  # (delta text, monotonic arrival)
    text: str = ""  # the result's text (genvisor) or the deltas joined (direct)
    error: str | None = None


class LatencyReport(msgspec.Struct):
    pid: int
    traces: list[StreamTrace]
    cpu_s: float = 0.0


# ---- the pool (the scenario's side) -------------------------------------------------


class LoadPool:
    """`with LoadPool(4) as pool: go, reports = pool.run([job, job, job, job])`.

    Each load process is `python -m bench.streaming_load --fd N`, talking pickles over
    a socket pair (a `multiprocessing` connection on fd N): not a `multiprocessing`
    child, which would re-import the scenario's own `__main__`."""

    def __init__(self, processes: int) -> None:
        self._conns: list[multiprocessing.connection.Connection] = []
        self.processes: list[subprocess.Popen] = []
        try:
            for _ in range(processes):
                ours, theirs = socket.socketpair()
                proc = subprocess.Popen([sys.executable, "-m", "bench.streaming_load", "--fd", str(theirs.fileno())],
                                        pass_fds=[theirs.fileno()], cwd=REPO, stdin=subprocess.DEVNULL)
                theirs.close()
                self._conns.append(multiprocessing.connection.Connection(ours.detach()))
                self.processes.append(proc)
            for conn in self._conns:
                _expect(conn, "up", 120)
        except BaseException:
            self.close()
            raise

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def __enter__(self) -> LoadPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self.processes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for conn in self._conns:
            conn.close()

    def run(self, jobs: list[Any], *, lead_s: float = 0.3, timeout_s: float = 1200.0) -> tuple[float, list[Any]]:
        """Give job i to process i (fewer jobs than processes: the rest sit out), start
        them together `lead_s` after the last is set up; returns (go, reports)."""
        busy = self._conns[: len(jobs)]
        for conn, job in zip(busy, jobs, strict=True):
            conn.send(job)
        for conn in busy:
            _expect(conn, "ready", 300)
        go = time.monotonic() + lead_s
        for conn in busy:
            conn.send(go)
        return go, [_expect(conn, "report", timeout_s) for conn in busy]


def _expect(conn: multiprocessing.connection.Connection, what: str, timeout_s: float) -> Any:
    if not conn.poll(timeout_s):
        raise TimeoutError(f"a load process sent no {what!r} within {timeout_s:g} s")
    kind, body = conn.recv()
    if kind == "failed":
        raise RuntimeError(f"a load process failed:\n{body}")
    if kind != what:
        raise RuntimeError(f"a load process sent {kind!r}, expected {what!r}")
    return body


# ---- a load process -------------------------------------------------------------------


def serve(conn: multiprocessing.connection.Connection) -> None:
    """A load process: one job at a time until told to stop (None)."""
    conn.send(("up", os.getpid()))
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            runner = _scripted if isinstance(job, ScriptedJob) else _latency
            conn.send(("report", runner(job, conn)))
        except BaseException:  # noqa: BLE001 — reported to the scenario, which raises it
            conn.send(("failed", traceback.format_exc()))


def _wait_for_go(conn: multiprocessing.connection.Connection) -> float:
    conn.send(("ready", None))
    go = conn.recv()
    if (ahead := go - time.monotonic()) > 0:
        time.sleep(ahead)  # pacing, not a wait for something to happen
    return go


def _scripted(job: ScriptedJob, conn: multiprocessing.connection.Connection) -> ScriptedReport:
    from genvisor.client import Client
    from genvisor.types import GenerationCanceled, GenerationEvent, GenerationResult

    expected = "".join(job.chunks)
    offsets = job.offsets_s or [0.0] * len(job.conversations)
    delays = job.delays_ms or [0] * len(job.conversations)
    with Client(job.endpoint, timeout_ms=120_000) as client:
        for conversation in job.conversations:
            client.send_user_message(conversation, "go")
        go = _wait_for_go(conn)
        cpu0 = time.process_time()
        by_ref: dict[str, StreamSummary] = {}
        texts: dict[str, list[str]] = {}
        for conversation, offset, delay_ms in zip(job.conversations, offsets, delays, strict=True):
            if (ahead := go + offset - time.monotonic()) > 0:
                time.sleep(ahead)  # pacing: generations start at the rate the scenario set
            options = {"chunks": job.chunks, "chunk_delay_ms": job.chunk_delay_ms, "delay_ms": delay_ms}
            ref = client.generate_assistant_reply(conversation, events=True, backend_opts=options, timeout_ms=job.timeout_ms)
            by_ref[ref] = StreamSummary(conversation, ref)
            texts[ref] = []
        submitted = time.monotonic()
        delta_bins: Counter[int] = Counter()
        event_bins: Counter[int] = Counter()
        other: Counter[str] = Counter()
        pending = len(by_ref)
        deadline = submitted + job.read_timeout_s
        sep = job.separator
        while pending and time.monotonic() < deadline:
            note = client.next_notification(timeout_ms=1000)
            if note is None:
                continue
            now = time.monotonic()
            stream = by_ref.get(note.ref)
            if stream is None:
                continue
            if isinstance(note, GenerationEvent):
                if note.kind != "delta":
                    other[note.kind] += 1
                    continue
                text = note.text or ""
                n = text.count(sep)
                b = int(now / BIN_S)
                delta_bins[b] += n
                event_bins[b] += 1
                if not stream.events:
                    stream.first_s = now
                stream.last_s = now
                stream.events += 1
                stream.deltas += n
                texts[note.ref].append(text)
            elif isinstance(note, GenerationResult):
                pending -= 1
                if note.error is not None:
                    stream.error = f"{note.error.category}: {note.error.message}"
                else:
                    assert note.result is not None
                    joined = "".join(texts[note.ref])
                    stream.complete = joined == note.result.text == expected
                    if not stream.complete:
                        stream.error = f"text mismatch: {len(joined)} chars streamed, result {len(note.result.text)}, expected {len(expected)}"
            elif isinstance(note, GenerationCanceled):
                pending -= 1
                stream.error = f"canceled: {note.reason}"
        finished = time.monotonic()
        for stream in by_ref.values():
            if not stream.complete and stream.error is None:
                stream.error = f"no result within {job.read_timeout_s:g} s"
        return ScriptedReport(
            pid=os.getpid(), streams=list(by_ref.values()), delta_bins=dict(delta_bins), event_bins=dict(event_bins),
            submitted_s=submitted, finished_s=finished, cpu_s=time.process_time() - cpu0, other_kinds=dict(other),
        )


def _latency(job: LatencyJob, conn: multiprocessing.connection.Connection) -> LatencyReport:
    traces: list[StreamTrace] = []
    lock = threading.Lock()
    readers = [_GenvisorReader(job, names) if job.path == "genvisor" else _DirectReader(job) for names in job.slots]
    try:
        go_box: list[float] = []
        start = threading.Barrier(len(job.slots) + 1)

        def slot(i: int) -> None:
            start.wait()
            go = go_box[0]
            if (ahead := go + job.offsets_s[i] - time.monotonic()) > 0:
                time.sleep(ahead)  # pacing: the slots' first streams are spread out
            for index, name in enumerate(job.slots[i]):
                trace = readers[i].stream(i, index, name)
                with lock:
                    traces.append(trace)

        threads = [threading.Thread(target=slot, args=(i,), daemon=True) for i in range(len(job.slots))]
        for thread in threads:
            thread.start()
        go_box.append(_wait_for_go(conn))
        cpu0 = time.process_time()
        start.wait()
        for thread in threads:
            thread.join(job.read_timeout_s * len(job.slots[0]) + 60)
        cpu = time.process_time() - cpu0
    finally:
        for reader in readers:
            reader.close()
    return LatencyReport(pid=os.getpid(), traces=traces, cpu_s=cpu)


class _GenvisorReader:
    def __init__(self, job: LatencyJob, conversations: list[str]) -> None:
        from genvisor.client import Client

        self.job = job
        self.client = Client(job.endpoint, timeout_ms=60_000)
        for conversation in conversations:  # connected, each conversation awaiting its reply, before the clock starts
            self.client.send_user_message(conversation, "go")

    def stream(self, slot: int, index: int, conversation: str) -> StreamTrace:
        from genvisor.types import GenerationCanceled, GenerationEvent, GenerationResult

        arrivals: list[tuple[str, float]] = []
        requested = time.monotonic()
        trace = StreamTrace(slot, index, requested, arrivals)
        try:
            ref = self.client.generate_assistant_reply(conversation, events=True, backend=self.job.backend, stream=True)
            deadline = requested + self.job.read_timeout_s
            while time.monotonic() < deadline:
                note = self.client.next_notification(timeout_ms=1000)
                if note is None or note.ref != ref:
                    continue
                if isinstance(note, GenerationEvent):
                    if note.kind == "delta":
                        arrivals.append((note.text or "", time.monotonic()))
                    continue
                if isinstance(note, GenerationResult):
                    if note.error is not None:
                        trace.error = f"{note.error.category}: {note.error.message}"
                    else:
                        assert note.result is not None
                        trace.text = note.result.text
                elif isinstance(note, GenerationCanceled):
                    trace.error = f"canceled: {note.reason}"
                return trace
            trace.error = f"no result within {self.job.read_timeout_s:g} s"
        except Exception as exc:  # noqa: BLE001 — the stream's failure, reported
            trace.error = repr(exc)
        return trace

    def close(self) -> None:
        self.client.close()


class _DirectReader:
    def __init__(self, job: LatencyJob) -> None:
        import openai

        self.job = job
        self.client = openai.OpenAI(base_url=job.base_url, api_key="unused", max_retries=0, timeout=job.read_timeout_s)

    def stream(self, slot: int, index: int, name: str) -> StreamTrace:
        arrivals: list[tuple[str, float]] = []
        requested = time.monotonic()
        trace = StreamTrace(slot, index, requested, arrivals)
        try:
            stream = self.client.chat.completions.create(model=self.job.model, messages=[{"role": "user", "content": name}],
                                                         stream=True)
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        arrivals.append((choice.delta.content, time.monotonic()))
            trace.text = "".join(text for text, _ in arrivals)
        except Exception as exc:  # noqa: BLE001 — the stream's failure, reported
            trace.error = repr(exc)
        return trace

    def close(self) -> None:
        self.client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.streaming_load", description="a load process of bench.streaming")
    parser.add_argument("--fd", type=int, required=True, help="this end of the socket pair to the scenario")
    args = parser.parse_args(argv)
    # The jobs unpickle as bench.streaming_load's classes, not this __main__'s: serve from there.
    from bench import streaming_load

    streaming_load.serve(multiprocessing.connection.Connection(args.fd))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
