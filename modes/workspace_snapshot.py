"""Snapshots of a workspace, for turns that are transactions: capture the workspace
before a run's first effect, list what a run changed, put it back as it was.

The mechanism, chosen by measuring (`python -m bench.workspace_options`; 10 000 files,
190 MiB, this 2-core ext4 machine, no reflinks): git's object store and an index of
genvisor's own, driven by plumbing commands. The store lives under genvisor's state
dir (`GIT_DIR`, `GIT_INDEX_FILE`), the workspace is only its work tree: the user's own
`.git`, if any, is never read or written. After the first (cold) snapshot, one when
nothing changed costs ≈40 ms and one after 120 changes ≈100 ms — an index compares
stat data, it re-reads only what changed — and restoring those 120 paths ≈75 ms; a
copy (`cp -a`) costs 2.5 s and 3.8 s. Content is stored once (deduplicated).

What a snapshot holds: every file (new, modified, deleted, renamed), its executable
bit, symlinks as links (never followed), and the list of directories (git keeps
files; a restore removes the directories a run made and remakes those it removed).
What it does not: the contents of `.git` directories (the workspace's own, and nested repositories,
which git records as a link to their commit), and paths matched by `excludes`
(gitignore-style patterns, e.g. `node_modules/`), which are neither captured nor
restored.

Every call blocks (it runs git): in the daemon, call it from a thread.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
from pathlib import Path
from typing import Literal, Sequence

import msgspec

EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"  # git's id of the empty tree

# A snapshot's ref must survive a daemon's kill -9 once it is taken: git writes objects
# and refs through temp files and renames; these make it fsync them too.
_DURABLE = ["-c", "core.fsync=objects,reference", "-c", "core.fsyncMethod=fsync"]


class SnapshotError(Exception):
    """git failed, or is missing; the message says what it said."""


class PathChange(msgspec.Struct, frozen=True):
    path: str
    change: Literal["added", "modified", "deleted"]
    mode_before: str | None  # git's mode: 100644, 100755, 120000 (symlink), 160000 (repository)
    mode_after: str | None
    blob_before: str | None
    blob_after: str | None


class SnapshotStore:
    def __init__(self, store: Path, workspace: Path, excludes: Sequence[str] = ()) -> None:
        self.store = store
        self.workspace = workspace
        self._pathspec = ["."] + [spec for pattern in excludes for spec in _exclude_pathspecs(pattern)]
        self._exclude_names = [p.strip().strip("/") for p in excludes if p.strip().strip("/")]
        self._env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
            "GIT_DIR": str(store),
            "GIT_INDEX_FILE": str(store / "genvisor-index"),
            "GIT_WORK_TREE": str(workspace),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,  # the user's settings (autocrlf, hooks…) play no part
        }
        if not (store / "HEAD").exists():
            store.parent.mkdir(parents=True, exist_ok=True)
            self._git("init", "--quiet", "--bare", str(store), cwd=store.parent, env_extra={"GIT_WORK_TREE": ""})
            # gc.auto 0: refs stay loose files (has_snapshot stats them), nothing runs behind our back.
            for key, value in (("core.autocrlf", "false"), ("core.filemode", "true"), ("core.symlinks", "true"),
                               ("core.untrackedCache", "true"), ("gc.auto", "0")):
                self._git("config", key, value)

    # ---- the three things it does --------------------------------------------------

    def snapshot(self, name: str) -> str:
        """Capture the workspace now, durably, as `name`; returns the tree's id."""
        self._git("add", "--all", "--force", "--", *self._pathspec)
        tree = self._git("write-tree").strip()
        # git keeps files, not directories: the snapshot's commit message lists them,
        # so that a restore removes the ones a run made and remakes the ones it removed.
        directories = "\n".join(sorted(self._directories()))
        self._git(*_DURABLE, "update-ref", f"refs/genvisor/{name}", self._commit(tree, directories))
        return tree

    def changes(self, before: str, after: str) -> list[PathChange]:
        """What differs from tree `before` to tree `after`, path by path (a rename is a
        deletion and an addition)."""
        out = self._git("diff-tree", "-r", "-z", "--no-renames", "--raw", before, after)
        fields = out.split("\0")
        changes = []
        for meta, path in zip(fields[0::2], fields[1::2]):
            if not meta:
                continue
            mode_a, mode_b, blob_a, blob_b, status = meta.lstrip(":").split(" ")
            zero = "0" * len(blob_a)
            kind = {"A": "added", "D": "deleted"}.get(status[0], "modified")
            changes.append(PathChange(
                path, kind,  # type: ignore[arg-type]
                None if mode_a == "000000" else mode_a, None if mode_b == "000000" else mode_b,
                None if blob_a == zero else blob_a, None if blob_b == zero else blob_b,
            ))
        return changes

    def restore(self, name: str) -> list[PathChange]:
        """Put the workspace back as snapshot `name` has it: what changed since is
        checked out from the snapshot, what was added is removed, and so are the
        directories the snapshot did not have (those it had are remade). Returns what
        it put back."""
        tree = self.tree(name)
        if tree is None:
            raise SnapshotError(f"no snapshot {name!r}")
        had = set(filter(None, self._git("log", "-1", "--format=%B", f"refs/genvisor/{name}").strip().splitlines()))
        now = self.snapshot("restoring")
        undo = self.changes(tree, now)
        self._git("read-tree", tree)
        # A nested repository (mode 160000) is recorded by its commit, not its files:
        # one the run added is removed with the rest, one it changed cannot be put back.
        back = [c.path for c in undo if c.change != "added" and c.mode_before != "160000"]
        # Removals first: a path the run turned from a file into a directory (or back)
        # must be free before the snapshot's version is checked out there.
        for change in undo:
            if change.change == "added":
                self._remove(change.path)
        for directory in sorted(self._directories() - had, key=len, reverse=True):  # the deepest first
            shutil.rmtree(self.workspace / directory)  # what is left in it is the run's too (rmtree follows no link)
        if back:
            self._git("checkout-index", "--force", "-z", "--stdin", stdin="\0".join(back) + "\0")
        for directory in sorted(had):
            (self.workspace / directory).mkdir(parents=True, exist_ok=True)
        self._git("update-ref", "-d", "refs/genvisor/restoring")
        return undo

    def _directories(self) -> set[str]:
        """The workspace's directories (relative paths), as git would see them: none
        inside a `.git`, none excluded, and no link followed."""
        found: set[str] = set()
        for root, dirs, _files in os.walk(self.workspace):
            relative_root = os.path.relpath(root, self.workspace)
            kept = []
            for name in dirs:
                relative = name if relative_root == "." else f"{relative_root}/{name}"
                if name == ".git" or os.path.islink(os.path.join(root, name)) or self._excluded(relative):
                    continue
                kept.append(name)
                found.add(relative)
            dirs[:] = kept
        return found

    def _excluded(self, relative: str) -> bool:
        return any(fnmatch.fnmatchcase(relative, pattern) or fnmatch.fnmatchcase(relative.rsplit("/", 1)[-1], pattern)
                   for pattern in self._exclude_names)

    # ---- helpers ---------------------------------------------------------------------

    def tree(self, name: str) -> str | None:
        done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"refs/genvisor/{name}^{{tree}}"],
                              env=self._env, cwd=self.workspace, capture_output=True, text=True)
        return done.stdout.strip() or None

    def drop(self, name: str) -> None:
        self._git("update-ref", "-d", f"refs/genvisor/{name}")

    def _commit(self, tree: str, message: str) -> str:
        # A ref names a commit, so that git's own tools (and a person) can read it.
        env = {"GIT_AUTHOR_NAME": "genvisor", "GIT_AUTHOR_EMAIL": "genvisor@localhost",
               "GIT_COMMITTER_NAME": "genvisor", "GIT_COMMITTER_EMAIL": "genvisor@localhost"}
        return self._git("commit-tree", tree, "-F", "-", stdin=message + "\n", env_extra=env).strip()

    def _remove(self, path: str) -> None:
        target = self.workspace / path
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # a nested repository the run added (rmtree follows no link)
        else:
            target.unlink(missing_ok=True)

    def _git(self, *args: str, stdin: str | None = None, cwd: Path | None = None,
             env_extra: dict[str, str] | None = None) -> str:
        env = {**self._env, **(env_extra or {})}
        env = {k: v for k, v in env.items() if v != ""}
        try:
            done = subprocess.run(["git", *args], env=env, cwd=cwd or self.workspace, input=stdin,
                                  capture_output=True, text=True)
        except FileNotFoundError:
            raise SnapshotError("git is not installed (workspace snapshots need it)") from None
        if done.returncode != 0:
            raise SnapshotError(f"git {args[0]} failed: {done.stderr.strip() or done.returncode}")
        return done.stdout


def _exclude_pathspecs(pattern: str) -> list[str]:
    """A gitignore-style exclude (`node_modules/`, `*.o`, `/build`) as pathspecs: what it
    names at any depth (at the root only, with a leading `/`), and everything below it."""
    name = pattern.strip().rstrip("/")
    anchored = name.startswith("/")
    name = name.lstrip("/")
    if not name:
        return []
    prefix = "" if anchored else "**/"
    return [f":(exclude,glob){prefix}{name}", f":(exclude,glob){prefix}{name}/**"]


# Tools that can change the workspace: a snapshot is taken before the first of them.
EFFECT_TOOLS = frozenset({"write_file", "edit_file", "run_command"})

WorkspaceSettled = Literal["restored", "unchanged", "restore_failed"]


def has_snapshot(store: str, name: str) -> bool:
    """Whether snapshot `name` exists, by one stat (its ref is a loose file: the store
    is never packed), so that a run that changed nothing costs its daemon no thread hop."""
    return os.path.exists(os.path.join(store, "refs", "genvisor", name))


def settle(store: str, workspace: str, run_id: str, *, completed: bool) -> tuple[WorkspaceSettled, list[str]] | None:
    """After a run's processes are gone: undo its changes unless it `completed`, and let
    its snapshot go. None when the run took no snapshot (it made no change); else what
    became of the workspace, and the paths concerned (those put back, or those that
    could not be)."""
    if not (Path(store) / "HEAD").exists():
        return None
    snapshots = SnapshotStore(Path(store), Path(workspace))
    if snapshots.tree(run_id) is None:
        return None
    if completed:
        snapshots.drop(run_id)
        return None
    try:
        undone = snapshots.restore(run_id)
    except (SnapshotError, OSError) as exc:
        return "restore_failed", [str(exc)]
    snapshots.drop(run_id)
    return ("restored" if undone else "unchanged"), [change.path for change in undone]
