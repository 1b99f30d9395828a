"""Workspace snapshots (the mechanism of issue 12's transactional turns): whatever a run
does to the files of its workspace, a restore gives back the workspace byte for byte —
files, executable bits, symlinks as links — leaves excluded paths and the user's own
`.git` alone, and a snapshot outlives the process that took it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from genvisor.modes.workspace_snapshot import SnapshotStore


def manifest(root: Path, skip: tuple[str, ...] = (".git",)) -> dict[str, tuple]:
    """Every entry below `root` (symlinks not followed): what it is and holds."""
    found: dict[str, tuple] = {}
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]
        for name in dirs + files:
            path = Path(directory) / name
            relative = str(path.relative_to(root))
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                found[relative] = ("link", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                if not os.path.islink(path):
                    found[relative] = ("dir",)
            else:
                found[relative] = ("file", bool(info.st_mode & stat.S_IXUSR), path.read_bytes())
    return found


@pytest.fixture
def workspace(tmp_path) -> Path:
    root = tmp_path / "ws"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "pkg" / "mod.py").write_text("print('hi')\n")
    (root / "src" / "keep.txt").write_text("KEEP\n")
    (root / "run.sh").write_text("#!/bin/sh\necho run\n")
    (root / "run.sh").chmod(0o755)
    (root / "blob.bin").write_bytes(bytes(range(256)) * 64)
    (root / "link-in").symlink_to("src/keep.txt")
    (root / "link-out").symlink_to("/etc/passwd")  # kept as a link, never followed
    return root


def store_for(tmp_path: Path, workspace: Path, excludes=()) -> SnapshotStore:
    return SnapshotStore(tmp_path / "state" / "snapshots" / "ws.git", workspace, excludes)


def test_a_restore_undoes_every_kind_of_change(tmp_path, workspace):
    store = store_for(tmp_path, workspace)
    before = manifest(workspace)
    store.snapshot("run_1")
    (workspace / "src" / "keep.txt").write_text("CHANGED\n")  # modified
    (workspace / "blob.bin").unlink()  # deleted
    (workspace / "src" / "pkg" / "mod.py").rename(workspace / "src" / "moved.py")  # renamed
    (workspace / "new" / "deep").mkdir(parents=True)  # a new directory tree
    (workspace / "new" / "deep" / "file.txt").write_text("new\n")
    (workspace / "run.sh").chmod(0o644)  # a mode bit
    (workspace / "link-in").unlink()
    (workspace / "link-in").symlink_to("blob-elsewhere")  # a link retargeted
    (workspace / "link-out").unlink()
    (workspace / "link-out").write_text("now a file\n")  # a link turned into a file
    undone = store.restore("run_1")
    assert {c.path for c in undone} >= {"src/keep.txt", "blob.bin", "src/moved.py", "src/pkg/mod.py", "new/deep/file.txt",
                                        "run.sh", "link-in", "link-out"}
    assert manifest(workspace) == before
    assert not (workspace / "new").exists()  # the directory the run made went with its files


def test_changes_name_each_path_once_with_what_happened(tmp_path, workspace):
    store = store_for(tmp_path, workspace)
    start = store.snapshot("a")
    (workspace / "src" / "keep.txt").write_text("CHANGED\n")
    (workspace / "blob.bin").unlink()
    (workspace / "added.txt").write_text("x")
    end = store.snapshot("b")
    assert {(c.path, c.change) for c in store.changes(start, end)} == {
        ("src/keep.txt", "modified"), ("blob.bin", "deleted"), ("added.txt", "added"),
    }
    assert store.changes(end, end) == []


def test_a_path_turned_from_a_file_into_a_directory_and_back_is_restored(tmp_path, workspace):
    store = store_for(tmp_path, workspace)
    before = manifest(workspace)
    store.snapshot("r")
    (workspace / "blob.bin").unlink()
    (workspace / "blob.bin").mkdir()
    (workspace / "blob.bin" / "inside").write_text("x")
    (workspace / "src" / "keep.txt").unlink()
    (workspace / "src").rename(workspace / "src-old")
    (workspace / "src").write_text("a file where a directory was\n")
    store.restore("r")
    assert manifest(workspace) == before


def test_excluded_paths_are_neither_captured_nor_restored(tmp_path, workspace):
    (workspace / "node_modules" / "lib").mkdir(parents=True)
    (workspace / "node_modules" / "lib" / "index.js").write_text("v1")
    store = store_for(tmp_path, workspace, excludes=["node_modules/", "*.log"])
    start = store.snapshot("r")
    (workspace / "node_modules" / "lib" / "index.js").write_text("v2")
    (workspace / "build.log").write_text("log")
    (workspace / "src" / "keep.txt").write_text("CHANGED\n")
    assert [c.path for c in store.changes(start, store.snapshot("now"))] == ["src/keep.txt"]
    store.restore("r")
    assert (workspace / "node_modules" / "lib" / "index.js").read_text() == "v2"
    assert (workspace / "build.log").read_text() == "log"
    assert (workspace / "src" / "keep.txt").read_text() == "KEEP\n"


def test_the_users_own_git_repository_is_never_touched(tmp_path, workspace):
    env = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_AUTHOR_NAME": "u", "GIT_AUTHOR_EMAIL": "u@x",
           "GIT_COMMITTER_NAME": "u", "GIT_COMMITTER_EMAIL": "u@x"}
    for argv in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "mine"]):
        subprocess.run(["git", *argv], cwd=workspace, env=env, check=True)
    dot_git = manifest(workspace / ".git", skip=())
    store = store_for(tmp_path, workspace)
    store.snapshot("r")
    (workspace / "src" / "keep.txt").write_text("CHANGED\n")
    store.restore("r")
    assert manifest(workspace / ".git", skip=()) == dot_git
    assert (workspace / "src" / "keep.txt").read_text() == "KEEP\n"


def test_a_snapshot_outlives_the_process_that_took_it(tmp_path, workspace):
    taken = store_for(tmp_path, workspace).snapshot("run_9")
    again = store_for(tmp_path, workspace)  # another process (a restarted daemon) opens the store
    assert again.tree("run_9") == taken
    (workspace / "src" / "keep.txt").write_text("CHANGED\n")
    again.restore("run_9")
    assert (workspace / "src" / "keep.txt").read_text() == "KEEP\n"
    again.drop("run_9")
    assert again.tree("run_9") is None


names = st.sampled_from(["a", "b", "c.txt", "d/e", "d/f.bin", "g/h/i"])
operations = st.lists(st.one_of(
    st.tuples(st.just("write"), names, st.binary(max_size=64)),
    st.tuples(st.just("delete"), names, st.none()),
    st.tuples(st.just("chmod"), names, st.booleans()),
    st.tuples(st.just("link"), names, names),
    st.tuples(st.just("mkdir"), names, st.none()),
    st.tuples(st.just("rmdir"), names, st.none()),
), max_size=12)


def _apply(root: Path, operation) -> None:
    kind, name, value = operation
    path = root / name
    try:
        if kind == "write":
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_symlink() or path.is_dir():
                return
            path.write_bytes(value)
        elif kind == "delete" and (path.is_symlink() or path.is_file()):
            path.unlink()
        elif kind == "chmod" and path.is_file() and not path.is_symlink():
            path.chmod(0o755 if value else 0o644)
        elif kind == "link" and not path.exists() and not path.is_symlink():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.symlink_to(value)
        elif kind == "mkdir" and not path.exists() and not path.is_symlink():
            path.mkdir(parents=True)  # empty: a directory git alone would not see
        elif kind == "rmdir" and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
    except (NotADirectoryError, FileExistsError, IsADirectoryError):
        pass  # a parent is a file or a link: that operation just cannot happen


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(setup=operations, run=operations)
def test_any_run_of_file_operations_is_undone_by_a_restore(tmp_path_factory, setup, run):
    base = tmp_path_factory.mktemp("prop")
    root = base / "ws"
    root.mkdir()
    for operation in setup:
        _apply(root, operation)
    store = SnapshotStore(base / "store.git", root)
    before = manifest(root)
    store.snapshot("r")
    for operation in run:
        _apply(root, operation)
    store.restore("r")
    assert manifest(root) == before  # directories included, empty ones too


def test_a_restore_keeps_what_the_index_knows_of_the_files_it_did_not_touch(tmp_path, workspace):
    # Were the index's stat data lost (a read-tree does that), the next snapshot would
    # re-read every file of the workspace: seconds for a large one instead of milliseconds.
    store = store_for(tmp_path, workspace)
    store.snapshot("run_1")
    (workspace / "src" / "keep.txt").write_text("CHANGED\n")
    (workspace / "new.txt").write_text("new\n")
    store.restore("run_1")
    stale = subprocess.run(["git", "diff-files", "--name-only"], env=store._env, cwd=workspace, capture_output=True, text=True)
    assert stale.returncode == 0 and stale.stdout == "", stale.stdout  # every entry's stat data matches its file


def test_an_anchored_exclude_is_the_root_one_only_and_a_deeper_namesake_is_restored(tmp_path, workspace):
    (workspace / "build").mkdir()
    (workspace / "src" / "build").mkdir()  # empty: only the directory list knows it
    store = store_for(tmp_path, workspace, excludes=["/build"])
    store.snapshot("r")
    (workspace / "src" / "build").rmdir()
    (workspace / "build" / "out.o").write_text("object")  # excluded: left alone
    store.restore("r")
    assert (workspace / "src" / "build").is_dir()  # a run's removal of it was undone
    assert (workspace / "build" / "out.o").read_text() == "object"
