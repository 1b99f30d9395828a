"""A completed turn's change set is its completion artifact (`LLMResult.changes`), kept
for later (`turn_changes`, also after a restart) and undoable (`revert_turn`), which
refuses, changing nothing, when a path the turn changed has changed since."""

from __future__ import annotations

import hashlib
import os

import pytest

from genvisor.errors import GenerationInProgress, InvalidOptions, LLMError, NotFound, RevertConflict

TOOLS = ["read_file", "write_file", "edit_file", "run_command"]
KEEP = "line one\nline two\n"
BLOB = bytes(range(256))


@pytest.fixture
def workspace(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "keep.txt").write_text(KEEP)
    (root / "gone.txt").write_text("to be deleted\n")
    (root / "blob.bin").write_bytes(BLOB)
    (root / "run.sh").write_text("#!/bin/sh\n")
    return root


def _tool(name, **arguments):
    return {"tool_calls": [{"name": name, "arguments": arguments}]}


def _sh(command: str):
    return _tool("run_command", argv=["sh", "-c", command])


def _start(client, conv, workspace, **metadata) -> None:
    client.start_conversation(conv, metadata={"workspace": str(workspace), **metadata})
    client.configure_skills(conv, TOOLS)


def _turn(client, conv, *script):
    """Run one turn of `script` steps to completion: its ref and result."""
    ref = client.generate_assistant_reply(conv, backend_opts={"script": [*script, {"text": "done"}]})
    return ref, client.await_generation(conv, ref)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


TURN = [_tool("edit_file", path="keep.txt", old="line two", new="line 2"),
        _tool("write_file", path="new/deep/file.txt", content="fresh\n"),
        _sh("rm gone.txt; printf 'x\\0y' > blob.bin; chmod +x run.sh")]


def test_a_completed_turn_reports_each_path_it_changed_with_sizes_hashes_and_a_diff(connect, conv, workspace):
    with connect() as client:
        _start(client, conv, workspace)
        client.send_user_message(conv, "change things")
        ref, result = _turn(client, conv, *TURN)
        changes = result.changes
        assert changes.ref == ref and changes.workspace == "changed" and changes.files_total == 5
        files = {f.path: f for f in changes.files}
        assert {p: f.change for p, f in files.items()} == {
            "keep.txt": "modified", "new/deep/file.txt": "added", "gone.txt": "deleted", "blob.bin": "modified", "run.sh": "modified"}
        keep = files["keep.txt"]
        assert (keep.size_before, keep.sha256_before) == (len(KEEP), _sha(KEEP.encode()))
        assert (keep.size_after, keep.sha256_after) == (len("line one\nline 2\n"), _sha(b"line one\nline 2\n"))
        assert files["new/deep/file.txt"].size_before is None and files["new/deep/file.txt"].sha256_after == _sha(b"fresh\n")
        assert files["gone.txt"].size_after is None and files["gone.txt"].sha256_after is None
        assert files["blob.bin"].binary and files["blob.bin"].sha256_after == _sha(b"x\0y")
        assert (files["run.sh"].mode_before, files["run.sh"].mode_after) == ("100644", "100755")
        assert "-line two\n+line 2\n" in changes.diff and "+fresh\n" in changes.diff
        assert "Binary files a/blob.bin and b/blob.bin differ" in changes.diff and not changes.diff_truncated
        assert client.turn_changes(conv, ref) == changes  # later, the same


def test_a_turn_that_changed_nothing_has_an_empty_change_set(connect, conv, workspace):
    with connect() as client:
        _start(client, conv, workspace)
        client.send_user_message(conv, "look")
        ref, result = _turn(client, conv, _tool("read_file", path="keep.txt"), _sh("cat keep.txt"))
        assert result.changes.workspace == "unchanged" and result.changes.files == [] and result.changes.diff == ""
        assert client.turn_changes(conv, ref).workspace == "unchanged"


def test_a_revert_puts_back_what_the_turn_changed_and_is_itself_revertible(connect, conv, workspace):
    before = {p.name: p.read_bytes() for p in workspace.iterdir() if p.is_file()}
    with connect() as client:
        _start(client, conv, workspace)
        client.send_user_message(conv, "change things")
        ref, result = _turn(client, conv, *TURN)
        (workspace / "unrelated.txt").write_text("the user's, made after the turn\n")
        reverted = client.revert_turn(conv, ref, reason="not what I wanted")
        assert reverted.reverts == ref and reverted.ref.startswith("rev_") and reverted.files_total == 5
        assert {p.name: p.read_bytes() for p in workspace.iterdir() if p.is_file() and p.name != "unrelated.txt"} == before
        assert not (workspace / "new").exists()  # the directories the turn made went too
        assert not os.access(workspace / "run.sh", os.X_OK)
        assert (workspace / "unrelated.txt").exists()  # what the turn did not touch stays
        note = [e.data for e in client.conversation_thread_entries(conv) if e.event == "turn_reverted"][-1]
        assert note["ref"] == ref and note["revert"] == reverted.ref and note["reason"] == "not what I wanted"
        assert client.turn_changes(conv, reverted.ref).files_total == 5
        again = client.revert_turn(conv, reverted.ref)  # undo the undo: the turn's changes are back
        assert again.reverts == reverted.ref
        assert (workspace / "keep.txt").read_text() == "line one\nline 2\n" and (workspace / "new/deep/file.txt").exists()
        assert not (workspace / "gone.txt").exists() and os.access(workspace / "run.sh", os.X_OK)


def test_a_revert_refuses_and_changes_nothing_when_a_path_changed_since(connect, conv, workspace):
    with connect() as client:
        _start(client, conv, workspace)
        client.send_user_message(conv, "change things")
        ref, _ = _turn(client, conv, *TURN)
        (workspace / "keep.txt").write_text("edited by hand since\n")
        (workspace / "gone.txt").write_text("back again\n")
        with pytest.raises(RevertConflict) as raised:
            client.revert_turn(conv, ref)
        assert raised.value.paths == ["gone.txt", "keep.txt"] and raised.value.ref == ref
        assert (workspace / "keep.txt").read_text() == "edited by hand since\n"
        assert (workspace / "new" / "deep" / "file.txt").read_text() == "fresh\n"  # nothing was put back
        assert not [e for e in client.conversation_thread_entries(conv) if e.event == "turn_reverted"]
        with pytest.raises(NotFound):
            client.revert_turn(conv, "gen_no_such_ref")


def test_a_revert_is_refused_while_a_generation_runs(connect, conv, workspace):
    with connect() as client:
        _start(client, conv, workspace)
        client.send_user_message(conv, "change things")
        ref, _ = _turn(client, conv, *TURN)
        client.send_user_message(conv, "more")
        running = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 60_000})
        with pytest.raises(GenerationInProgress):
            client.revert_turn(conv, ref)
        with pytest.raises(GenerationInProgress):
            client.turn_changes(conv, running)
        client.cancel_generation(conv, "done testing")


def test_excluded_paths_are_neither_snapshotted_nor_restored_nor_reported(connect, conv, workspace):
    (workspace / "node_modules").mkdir()
    (workspace / "node_modules" / "dep.js").write_text("v1\n")
    with connect() as client:
        _start(client, conv, workspace, workspace_excludes=["node_modules/"])
        client.send_user_message(conv, "install")
        ref, result = _turn(client, conv, _sh("echo v2 > node_modules/dep.js; echo new > keep.txt"))
        assert [f.path for f in result.changes.files] == ["keep.txt"]
        client.send_user_message(conv, "install again, then fail")
        failing = client.generate_assistant_reply(conv, backend_opts={"script": [_sh("echo v3 > node_modules/dep.js; rm keep.txt")]})
        with pytest.raises(LLMError):
            client.await_generation(conv, failing)
    assert (workspace / "keep.txt").read_text() == "new\n"  # restored
    assert (workspace / "node_modules" / "dep.js").read_text() == "v3\n"  # excluded: left as the run made it


@pytest.mark.parametrize("metadata", [
    {"workspace": "relative/path"}, {"workspace": 7}, {"workspace_excludes": "node_modules/"},
    {"workspace_excludes": ["ok/", ""]}, {"workspace_excludes": ["a\nb"]}, {"workspace_excludes": [3]},
])
def test_bad_workspace_metadata_is_refused_and_starts_nothing(connect, conv, metadata):
    with connect() as client:
        with pytest.raises(InvalidOptions) as raised:
            client.start_conversation(conv, metadata=metadata)
        assert raised.value.field.startswith("metadata.workspace")
        with pytest.raises(NotFound):
            client.conversation(conv)


def test_a_change_set_outlives_a_restart(daemon, conv, workspace):
    with daemon.client() as client:
        _start(client, conv, workspace)
        client.send_user_message(conv, "change things")
        ref, result = _turn(client, conv, *TURN)
    daemon.stop()
    daemon.start()
    with daemon.client() as client:
        assert client.turn_changes(conv, ref) == result.changes
        client.revert_turn(conv, ref)
    assert (workspace / "keep.txt").read_text() == KEEP and (workspace / "gone.txt").exists()


def test_a_revert_a_killed_daemon_left_half_done_is_undone_at_restart(daemon, conv, workspace):
    from pathlib import Path

    from genvisor.modes.workspace_snapshot import SnapshotStore

    with daemon.client() as client:
        _start(client, conv, workspace)
        client.send_user_message(conv, "change things")
        _turn(client, conv, *TURN)
    daemon.stop()
    # The state a daemon killed in the middle of a revert leaves: the revert's before-state
    # kept, some paths already put back, no after-state, nothing journaled.
    [store] = (daemon.directory / "state" / "snapshots").glob("*.git")
    SnapshotStore(Path(store), workspace).snapshot("turns/rev_interrupted/before")
    as_the_turn_left_it = (workspace / "keep.txt").read_text()
    (workspace / "keep.txt").write_text(KEEP)  # half reverted
    daemon.start()
    with daemon.client() as client:
        note = [e.data for e in client.conversation_thread_entries(conv) if e.event == "workspace_restored"][-1]
    assert note["run_id"] == "rev_interrupted" and note["workspace"] == "restored" and note["paths"] == ["keep.txt"]
    assert (workspace / "keep.txt").read_text() == as_the_turn_left_it  # back as before the revert began
    assert not (Path(store) / "refs" / "genvisor" / "turns" / "rev_interrupted").exists()
