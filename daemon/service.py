"""What a daemon serves, transport-free: its conversations (`Conversations`), their
generations (`Generations`), the change sets of their turns (`ChangeSets`), and how it
is doing (`status`). The front (daemon.front) calls these; nothing here knows about
sockets.

It hands runs to an `Executor` (worker processes in the daemon, the in-process
executor when embedded) and sends notifications through the `notify` callable it is
given.
"""

from __future__ import annotations

from pathlib import Path

import trio

from genvisor.daemon.admission import Admission
from genvisor.daemon.change_sets import ChangeSets
from genvisor.daemon.conversations import Conversations
from genvisor.daemon.durable import DurableLog
from genvisor.daemon.generations import Executor, Generations, Notify
from genvisor.daemon.store import Snapshot
from genvisor.daemon.telemetry import Telemetry
from genvisor.daemon.workspaces import Workspaces
from genvisor.modes.llm import RunDefaults
from genvisor.modes.registry import registry
from genvisor.supervisor.cluster import RayExecutor
from genvisor.types import DaemonInfo, DaemonStatus


class Service:
    def __init__(
        self, *, executor: Executor, journal: DurableLog, admission: Admission, defaults: RunDefaults,
        deadline_grace_s: float, retention_s: float, workspaces: Path, notify: Notify, snapshots: Path | None = None,
    ) -> None:
        self._executor = executor
        self.journal = journal
        self.admission = admission
        self.telemetry = telemetry = Telemetry(modes=list(registry()), backends=list(defaults.backends))
        telemetry.gauge("genvisor_active_workers", "Runs holding a worker slot", lambda: admission.active)
        telemetry.gauge("genvisor_queue_depth", "Admitted runs waiting for a worker slot", lambda: admission.queued)
        telemetry.gauge("genvisor_spare_workers", "Pre-forked workers waiting for a run", lambda: executor.health().spare_workers)
        telemetry.gauge("genvisor_journal_unsynced", "Journal writes not yet durable", lambda: journal.submitted - journal.durable)
        telemetry.by_node(executor.health)
        # On a cluster, the daemon's work on a workspace is done on the node that holds it.
        places = Workspaces(workspaces, snapshots, nodes=executor if isinstance(executor, RayExecutor) else None)
        self.conversations = Conversations(journal, cancel_active=lambda conversation, reason: self.generations.cancel_all(conversation, reason))
        self.generations = Generations(
            executor=executor, journal=journal, conversations=self.conversations, workspaces=places, admission=admission,
            defaults=defaults, deadline_grace_s=deadline_grace_s, retention_s=retention_s, notify=notify, telemetry=telemetry,
        )
        self.change_sets = ChangeSets(self.conversations, places)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(self.journal.run)
            await nursery.start(self.generations.run)
            task_status.started()

    def restore(self, snapshot: Snapshot) -> int:
        """Take back what the store holds; call once, before serving (then
        `generations.settle_interrupted`). Returns how many generations that were in
        flight when the daemon died were resolved as `daemon_restarted`."""
        self.conversations.restore(snapshot.conversations)
        return self.generations.restore(snapshot.generations)

    def status(self, info: DaemonInfo, metrics: str | None) -> DaemonStatus:
        t, health, admission = self.telemetry, self._executor.health(), self.admission
        return DaemonStatus(
            info=info,
            metrics=metrics,
            journal=self.journal.store.describe(),
            journal_unsynced=self.journal.submitted - self.journal.durable,
            conversations=len(self.conversations),
            active_runs=admission.active,
            max_active=admission.max_active,
            queued_runs=admission.queued,
            max_queued=admission.max_queued,
            spare_workers=health.spare_workers,
            runs_started=t.total(t.runs_started),
            runs_finished={outcome: t.total(t.runs_finished, outcome=outcome) for outcome in ("completed", "failed", "canceled")},
            admissions_rejected=t.total(t.admissions_rejected),
            requests_received=t.total(t.requests_received),
            frames_rejected=t.total(t.frames_rejected),
            requests_refused_unread=t.total(t.requests_refused_unread),
            events_shed=t.total(t.events_shed),
            cleanup_failures=t.total(t.cleanup_failures),
            zygote_restarts=health.zygote_restarts,
            run_latency=t.summary(t.run_seconds),
            queue_wait=t.summary(t.queue_wait_seconds),
            worker_spawn=t.summary(t.worker_spawn_seconds),
            cancel_reaped=t.summary(t.cancel_reaped_seconds),
            executor="local" if health.cluster is None else "ray",
            cluster=health.cluster,
            nodes=health.nodes,
            nodes_lost=health.nodes_lost,
        )
