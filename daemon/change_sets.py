"""A completed turn's change set, read back and undone (see modes.workspace_snapshot):
`turn_changes` and `revert_turn`. A revert is itself a change set, with a ref of its
own, so it can be read back and undone too.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets

import msgspec
import trio

from genvisor.daemon.conversations import ConversationRecord, Conversations, note
from genvisor.daemon.workspaces import Workspaces
from genvisor.errors import GenerationInProgress, NotFound, RevertConflict
from genvisor.logevent import event
from genvisor.types import Locator, WorkspaceChanges

log = logging.getLogger("genvisor.daemon")


@dataclasses.dataclass(frozen=True)
class ChangeSet:
    """What a `turn_changes` or `revert_turn` names: a run's (by its run id) or a
    revert's (by its own id) change set."""

    conversation: ConversationRecord
    ref: str
    name: str  # its name in the workspace's snapshot store
    kept: bool  # a completed run's, or a revert: its change set may be kept
    reverts: str | None = None


class ChangeSets:
    def __init__(self, conversations: Conversations, workspaces: Workspaces) -> None:
        self._conversations = conversations
        self._workspaces = workspaces

    async def settle_interrupted(self) -> None:
        """Undo the reverts a killed daemon left half done (call before serving): each
        workspace goes back as it was before its revert began, journaled as a
        `workspace_restored` note under the revert's id (it was never journaled itself)."""
        seen: set[str] = set()
        for conversation in self._conversations:
            workspace = self._workspaces.directory(conversation.key, conversation.metadata)
            store = self._workspaces.store(workspace)
            if store is None or store in seen or not self._workspaces.held(workspace):
                continue
            seen.add(store)
            for revert in await self._workspaces.interrupted_reverts(store, workspace):
                result, paths = await self._workspaces.undo_revert(store, workspace, revert)
                self._conversations.append(conversation, kind="note", event="workspace_restored",
                                           data={"run_id": revert, "workspace": result, "paths": paths[:100], "paths_total": len(paths)})
                event(log, "revert.undone", logging.ERROR if result == "restore_failed" else logging.WARNING, revert=revert,
                      conversation=conversation.key[1], workspace=result, paths=len(paths))

    def find_change_set(self, loc: Locator, ref: str) -> ChangeSet:
        """The synchronous half of `turn_changes` and `revert_turn`: what `ref` names —
        a generation of this conversation that has ended, or a revert of it."""
        conversation = self._conversations.fetch(loc)
        for entry in reversed(conversation.journal):
            data = entry.data
            if entry.event == "run_started" and data.get("ref") == ref:
                if conversation.active is not None and conversation.active.record.ref == ref:
                    raise GenerationInProgress(f"generation {ref} is still running: await it first")
                run_id = data["run_id"]
                finished = note(conversation, "run_finished", run_id) or {}
                return ChangeSet(conversation, ref, run_id, kept=finished.get("status") == "completed")
            if entry.event == "turn_reverted" and data.get("revert") == ref:
                return ChangeSet(conversation, ref, ref, kept=True, reverts=data.get("ref"))
        raise NotFound(f"no generation or revert {ref!r} in this conversation")

    async def turn_changes(self, change_set: ChangeSet) -> WorkspaceChanges:
        """What the turn (or revert) did to the workspace; for a run that did not
        complete, what became of the workspace once it was settled."""
        conversation = change_set.conversation
        await conversation.workspace_settled.wait()  # a run just canceled may still be being undone
        if not change_set.kept:
            settled = note(conversation, "workspace_restored", change_set.name)
            if settled is None:
                return WorkspaceChanges(ref=change_set.ref, workspace="unchanged")
            return WorkspaceChanges(ref=change_set.ref, workspace=settled["workspace"], paths=list(settled.get("paths", [])))
        if not self._workspaces.transactional:
            return WorkspaceChanges(ref=change_set.ref)
        # Read from the kept trees, not from a retained outcome: the same answer, and
        # one that outlives the outcome's retention.
        workspace = self._workspaces.directory(conversation.key, conversation.metadata)
        store = self._workspaces.store(workspace)
        assert store is not None  # transactional: every workspace has its store
        changes = await self._workspaces.kept(store, workspace, change_set.name, change_set.ref)
        if changes is None:
            return WorkspaceChanges(ref=change_set.ref, reverts=change_set.reverts)
        return msgspec.structs.replace(changes, reverts=change_set.reverts)

    def check_revertible(self, loc: Locator, ref: str) -> ChangeSet:
        change_set = self.find_change_set(loc, ref)
        if change_set.conversation.active is not None:
            raise GenerationInProgress(f"conversation {change_set.conversation.key[1]!r} has an active generation")
        return change_set

    async def revert_turn(self, change_set: ChangeSet, reason: str | None) -> WorkspaceChanges:
        """Put back every path the change set changed, if each is still as it left it
        (else RevertConflict, and nothing changes). The conversation's next run, and
        the next revert, wait for it."""
        conversation = change_set.conversation
        before, done = conversation.workspace_settled, trio.Event()
        conversation.workspace_settled = done
        revert = "rev_" + secrets.token_urlsafe(12)
        try:
            await before.wait()
            if not self._workspaces.transactional:
                result: WorkspaceChanges | list[str] = WorkspaceChanges(ref=revert)
            else:
                workspace = self._workspaces.directory(conversation.key, conversation.metadata)
                store = self._workspaces.store(workspace)
                assert store is not None  # transactional: every workspace has its store
                with trio.CancelScope(shield=True):  # begun, a revert is seen through
                    result = await self._workspaces.revert(store, workspace, change_set.name, revert)
        finally:
            done.set()
        if isinstance(result, list):
            raise RevertConflict(change_set.ref, result)
        paths = [f.path for f in result.files][:100]
        self._conversations.append(conversation, kind="note", event="turn_reverted",
                                   data={"ref": change_set.ref, "revert": revert, "reason": reason, "paths": paths,
                                         "paths_total": result.files_total})
        event(log, "turn.reverted", ref=change_set.ref, revert=revert, conversation=conversation.key[1], paths=result.files_total)
        return msgspec.structs.replace(result, reverts=change_set.ref)
