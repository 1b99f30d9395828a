"""The embedded daemon: a daemon's service inside this process, its runs in-process.

No daemon process, no sockets, no worker processes — for tests and for embedding
genvisor in a Python program. It is the same `Service` behind the same `Front`,
driven by the same `Client` through an in-memory pipe (`connect`, the transport a
client opens); only the executor differs. Trio runs in a background thread, so the
client side stays synchronous.

    with EmbeddedDaemon() as daemon, Client(transport=daemon.connect) as client:
        conversation, result = client.send_and_generate("c1", "hello")
"""

from __future__ import annotations

import itertools
import queue
import threading

import trio
import zmq

from genvisor.daemon.config import Config
from genvisor.daemon.front import Front, open_front
from genvisor.daemon.server import WORKER_TARGET
from genvisor.daemon.service import Service
from genvisor.daemon.store import MemoryStore, Store
from genvisor.supervisor.inprocess import InProcessExecutor


class EmbeddedDaemon:
    def __init__(self, config: Config | None = None, store: Store | None = None) -> None:
        self._config = config or Config()
        # In memory unless given: an embedded daemon lives as long as its program.
        # A store passed in outlives the daemon (a second one over it sees the first's).
        self._store = store or MemoryStore()
        self._inboxes: dict[int, queue.SimpleQueue[bytes]] = {}
        self._owners = itertools.count(1)
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._front: Front | None = None
        self._nursery: trio.Nursery | None = None
        self._failure: BaseException | None = None
        self.service: Service | None = None  # for inspection (telemetry) from this thread

    def __enter__(self) -> EmbeddedDaemon:
        self._thread = threading.Thread(target=self._main, name="genvisor-embedded", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise RuntimeError("the embedded daemon failed to start") from self._failure
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._thread is None:
            return
        if self._stop is not None and self._token is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join()
        self._thread = None

    # ---- the Trio side -----------------------------------------------------------------

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # noqa: BLE001 — reported to the starting thread
            self._failure = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        executor = InProcessExecutor(WORKER_TARGET)
        front = self._front = await open_front(self._config, executor, "embedded", self._store)
        service = self.service = front.service
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(executor.run)
            await nursery.start(service.run)
            nursery.start_soon(front.pump, self._deliver)
            self._ready.set()
            await self._stop.wait()
            service.generations.shutdown()
            await service.generations.drained()
            await front.flush()
            nursery.cancel_scope.cancel()

    def _deliver(self, owner: int, data: bytes) -> None:
        inbox = self._inboxes.get(owner)
        if inbox is not None:  # a closed client's notifications go nowhere, as over ZeroMQ
            inbox.put(data)
        assert self._front is not None
        self._front.delivered(owner, len(data))

    # ---- the client side ---------------------------------------------------------------

    def connect(self) -> _Pipe:
        """A new client connection: the transport `Client(transport=daemon.connect)` opens."""
        owner = next(self._owners)
        self._inboxes[owner] = queue.SimpleQueue()
        return _Pipe(self, owner)


class _Pipe:
    """A client's end of the in-memory transport (the `Transport` a Client needs)."""

    def __init__(self, runtime: EmbeddedDaemon, owner: int) -> None:
        self._runtime = runtime
        self._owner = owner
        self._inbox = runtime._inboxes[owner]
        self._pending: bytes | None = None

    def send(self, data: bytes) -> None:
        runtime = self._runtime
        assert runtime._front is not None and runtime._nursery is not None  # a client connects to a started daemon
        trio.from_thread.run_sync(runtime._front.receive, runtime._nursery, self._owner, data, trio_token=runtime._token)

    def poll(self, timeout_ms: int, flags: int = zmq.POLLIN) -> int:
        if self._pending is None:
            try:
                self._pending = self._inbox.get(timeout=max(0, timeout_ms) / 1000)
            except queue.Empty:
                return 0
        return zmq.POLLIN

    def recv(self) -> bytes:
        if self._pending is None:
            self._pending = self._inbox.get()
        data, self._pending = self._pending, None
        return data

    def close(self, linger: int | None = None) -> None:
        self._runtime._inboxes.pop(self._owner, None)
