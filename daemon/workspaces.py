"""Where a conversation's runs work, and the workspace side of a run's end: undo what
a run that did not complete changed, keep what a completed one did as its change set
(see modes.workspace_snapshot, which does the work; this is the daemon's side of it).

Every git call blocks: they run in a thread, and whatever goes wrong there is a
`restore_failed` to report, never the daemon's end.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import msgspec
import trio

from genvisor.errors import ErrorInfo, WorkspaceUnavailable
from genvisor.modes import workspace_snapshot
from genvisor.modes.llm import RunSpec
from genvisor.supervisor.cluster import ClusterUnavailable
from genvisor.types import WorkspaceChanges

log = logging.getLogger("genvisor.daemon")

ConversationKey = tuple[str | None, str]
Settled = tuple[str, list[str]]  # what became of the workspace, and the paths concerned
T = TypeVar("T")


class OnNodes(Protocol):
    """Workspaces on a cluster's nodes (supervisor.cluster.RayExecutor)."""

    def holds(self, workspace: str) -> bool:
        """Whether a node may hold what runs did to `workspace`."""
        ...

    async def call(self, workspace: str, op: str, args: list[Any], result_type: Any) -> Any:
        """Workspace function `op` (of modes.workspace_snapshot.NODE_CALLS) with `args`, on
        the node that holds `workspace`; its result decoded as `result_type`."""
        ...


class Workspaces:
    def __init__(self, root: Path, snapshots: Path | None, nodes: OnNodes | None = None) -> None:
        self._root = root
        self._snapshots = snapshots  # None: runs are not transactions (no snapshots taken)
        self._nodes = nodes  # None: the workspaces are on this machine

    async def _do(self, workspace: str, result_type: Any, function: Callable[..., T], *args: Any) -> T:
        """`function(*args)` where `workspace` is: in a thread here, or on its node."""
        if self._nodes is None:
            return await trio.to_thread.run_sync(function, *args)
        try:
            result: T = await self._nodes.call(workspace, function.__name__, list(args), result_type)
        except ClusterUnavailable as exc:
            raise WorkspaceUnavailable(str(exc)) from None
        return result

    def held(self, workspace: str) -> bool:
        """Whether runs may have left anything of theirs in `workspace` (its snapshots):
        here, a store may exist; on a cluster, a node must have run it."""
        return self._nodes is None or self._nodes.holds(workspace)

    @property
    def transactional(self) -> bool:
        return self._snapshots is not None

    def directory(self, key: ConversationKey, metadata: dict[str, Any]) -> str:
        """`metadata["workspace"]`, else the conversation's own directory under the state
        dir (created by the worker, which does every side effect of a run)."""
        chosen = metadata.get("workspace")
        if isinstance(chosen, str) and os.path.isabs(chosen):
            return chosen
        project, id_ = key
        digest = hashlib.sha256(repr(key).encode()).hexdigest()[:12]
        return os.path.join(self._root, _safe(project or "_"), f"{_safe(id_)[:40]}-{digest}")

    def store(self, workspace: str) -> str | None:
        """The snapshots of a workspace: one store per workspace directory, whichever
        conversations use it (None when runs are not transactions)."""
        if self._snapshots is None:
            return None
        # os.path, not pathlib: pathlib interns every part of every path it parses, for good.
        return os.path.join(self._snapshots, hashlib.sha256(os.fsencode(os.path.realpath(workspace))).hexdigest()[:24] + ".git")

    def changed(self, spec: RunSpec) -> bool:
        """Whether the run took a snapshot (it made, or was about to make, a change)."""
        # A run refused before it started (no request) reached no worker, on any node.
        return spec.snapshot_store is not None and spec.request is not None and self.may_have_snapshot(spec.snapshot_store, spec.run_id)

    def may_have_snapshot(self, store: str, name: str) -> bool:
        """Here, one stat says. A node's disk cannot be looked at from here: maybe, and
        the settling (on the node) finds out."""
        return self._nodes is not None or workspace_snapshot.has_snapshot(store, name)

    async def settle(self, store: str, workspace: str, run_id: str, *, completed: bool) -> Settled | None:
        """Once a run's processes are gone: undo its changes unless it `completed` (then
        keep them as its change set). None when it had nothing to undo."""
        try:
            return await self._do(workspace, Settled | None, workspace_snapshot.settle_run, store, workspace, run_id, completed)
        except Exception as exc:  # noqa: BLE001 — a restore that fails is reported, never silent, never the daemon's end
            log.exception("settling the workspace of run %s failed", run_id)
            return "restore_failed", [f"{type(exc).__name__}: {exc}"]

    async def interrupted_reverts(self, store: str, workspace: str) -> list[str]:
        return await self._do(workspace, list[str], workspace_snapshot.interrupted_reverts, store)

    async def undo_revert(self, store: str, workspace: str, revert: str) -> Settled:
        return await self._do(workspace, Settled, workspace_snapshot.undo_revert, store, workspace, revert)

    async def kept(self, store: str, workspace: str, name: str, ref: str) -> WorkspaceChanges | None:
        return await self._do(workspace, WorkspaceChanges | None, workspace_snapshot.kept_changes, store, workspace, name, ref)

    async def revert(self, store: str, workspace: str, name: str, revert: str) -> WorkspaceChanges | list[str]:
        return await self._do(workspace, WorkspaceChanges | list[str], workspace_snapshot.revert_change_set, store, workspace, name, revert)

    def said(self, error: ErrorInfo, result: str, paths: list[str]) -> ErrorInfo:
        """`error`, whose details say what became of the run's workspace."""
        if self._snapshots is None:
            return error
        details: dict[str, Any] = {**(error.details or {}), "workspace": result}
        if result == "restore_failed":
            details["workspace_paths"] = paths[:100]
        return msgspec.structs.replace(error, details=details)


def excludes(metadata: dict[str, Any]) -> list[str]:
    """The conversation's `workspace_excludes` (checked when it was started)."""
    chosen = metadata.get("workspace_excludes")
    return [p for p in chosen if isinstance(p, str)] if isinstance(chosen, list) else []


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"
