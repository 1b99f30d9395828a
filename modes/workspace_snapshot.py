"""Snapshots of a workspace, for turns that are transactions: capture the workspace
before a run's first effect, list what a run changed, put it back as it was, and undo
a turn that completed.

The mechanism, chosen by measuring (`python -m bench.workspace_options`, then
`python -m bench.workspace`; this 2-core ext4 machine, no reflinks): git's object store
and an index of genvisor's own, driven by plumbing commands. The store lives under
genvisor's state dir (`GIT_DIR`, `GIT_INDEX_FILE`), the workspace is only its work
tree: the user's own `.git`, if any, is never read or written. At 10 000 files
(192 MiB) a snapshot when nothing changed costs ≈50 ms and the restore of 100 changed
files ≈130 ms — an index compares stat data, it re-reads only what changed — where a
copy (`cp -a`) costs 4–6 s. Content is stored once (deduplicated).

What a snapshot holds: every file (new, modified, deleted, renamed), its executable
bit, symlinks as links (never followed), and the list of directories (git keeps
files; a restore removes the directories a run made and remakes those it removed).
What it does not: the contents of `.git` directories (the workspace's own, and nested
repositories, which git records as a link to their commit), and paths matched by
`excludes` (gitignore-style patterns, e.g. `node_modules/`), which are neither
captured nor restored.

The refs of a store (all under `refs/genvisor/`):
- `<run_id>`: taken before a run's first effect, until the run is settled;
- `turns/<name>/before` and `turns/<name>/after`: a change set that was kept — a
  completed run's (`name` is its run id) or a revert's (its revert id) — so that it
  can be listed and undone later.

Every call blocks (it runs git): in the daemon, call it from a thread.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import msgspec

from genvisor.types import FileChange, WorkspaceChanges

# A snapshot's ref must survive a daemon's kill -9 once it is taken: git writes objects
# and refs through temp files and renames; these make it fsync them too.
_DURABLE = ["-c", "core.fsync=objects,reference", "-c", "core.fsyncMethod=fsync"]

# A change set travels in a run's result and a reply: its listing and diff are bounded
# (the trees behind them are not: a revert undoes every path, listed or not).
MAX_LISTED_FILES = 2_000
MAX_DIFF_BYTES = 256 * 1024
_BINARY_SNIFF = 8_000  # git's heuristic: a NUL in the first 8 000 bytes means binary


class SnapshotError(Exception):
    """git failed, or is missing; the message says what it said."""


class PathChange(msgspec.Struct, frozen=True):
    path: str
    change: Literal["added", "modified", "deleted"]
    mode_before: str | None  # git's mode: 100644, 100755, 120000 (symlink), 160000 (repository)
    mode_after: str | None
    blob_before: str | None
    blob_after: str | None


class _Meta(msgspec.Struct, frozen=True):
    """What a snapshot's commit message holds beside its tree."""

    directories: list[str] = []
    excludes: list[str] = []


_meta_decoder = msgspec.json.Decoder(_Meta)


class SnapshotStore:
    def __init__(self, store: Path, workspace: Path, excludes: Sequence[str] = ()) -> None:
        self.store = store
        self.workspace = workspace
        self.excludes = list(excludes)
        self._pathspec = ["."] + [spec for pattern in excludes for spec in _exclude_pathspecs(pattern)]
        # For the directory walk, as git reads the patterns (`_exclude_pathspecs`): an
        # anchored one (`/build`) names a path from the root, any other a name at any depth.
        self._exclude_names = [(p.strip().startswith("/"), p.strip().strip("/")) for p in excludes if p.strip().strip("/")]
        # An index per exclude list: a path one list excludes must not linger in the
        # index another's snapshots are written from.
        index = "genvisor-index" + (f"-{hashlib.sha256(repr(self.excludes).encode()).hexdigest()[:12]}" if excludes else "")
        self._env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
            "GIT_DIR": str(store),
            "GIT_INDEX_FILE": str(store / index),
            "GIT_WORK_TREE": str(workspace),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,  # the user's settings (autocrlf, hooks…) play no part
        }
        if not (store / "HEAD").exists():
            store.parent.mkdir(parents=True, exist_ok=True)
            self._git("init", "--quiet", "--bare", str(store), cwd=store.parent, env_extra={"GIT_WORK_TREE": ""})
            # gc.auto 0: refs stay loose files (has_snapshot stats them), nothing runs behind our back.
            for key, value in (("core.autocrlf", "false"), ("core.filemode", "true"), ("core.symlinks", "true"),
                               ("core.untrackedCache", "true"), ("core.quotePath", "false"), ("gc.auto", "0")):
                self._git("config", key, value)

    @classmethod
    def of(cls, store: Path, workspace: Path, name: str) -> SnapshotStore:
        """The store as snapshot `name` was taken: with its excludes."""
        return cls(store, workspace, cls(store, workspace)._meta(name).excludes)

    # ---- snapshots -----------------------------------------------------------------

    def snapshot(self, name: str) -> str:
        """Capture the workspace now, durably, as `name`; returns the tree's id."""
        # git keeps files, not directories: the snapshot's commit message lists them,
        # so that a restore removes the ones a run made and remakes the ones it removed.
        # Both are scans of the whole tree (≈15 ms each for 10 000 files here): side by side.
        found: list[set[str] | OSError] = []

        def walk() -> None:
            try:
                found.append(self._directories())
            except OSError as exc:
                found.append(exc)

        walker = threading.Thread(target=walk, daemon=True)
        walker.start()
        try:
            tree = self._scan()
        finally:
            walker.join()
        if isinstance(found[0], OSError):
            raise found[0]
        meta = _Meta(sorted(found[0]), self.excludes)
        self._git(*_DURABLE, "update-ref", f"refs/genvisor/{name}", self._commit(tree, msgspec.json.encode(meta).decode()))
        return tree

    def _scan(self) -> str:
        """The tree of the workspace as it is now (its files only; not kept by a ref)."""
        self._git("add", "--all", "--force", "--", *self._pathspec)
        return self._git("write-tree").strip()

    def changes(self, before: str, after: str) -> list[PathChange]:
        """What differs from tree `before` to tree `after`, path by path (a rename is a
        deletion and an addition)."""
        out = self._git("diff-tree", "-r", "-z", "--no-renames", "--raw", before, after)
        fields = out.split("\0")
        changes = []
        for meta, path in zip(fields[0::2], fields[1::2], strict=False):
            if not meta:
                continue
            mode_a, mode_b, blob_a, blob_b, status = meta.lstrip(":").split(" ")
            zero = "0" * len(blob_a)
            kinds: dict[str, Literal["added", "modified", "deleted"]] = {"A": "added", "D": "deleted"}
            kind = kinds.get(status[0], "modified")
            changes.append(PathChange(
                path, kind,
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
        had = set(self._meta(name).directories)
        if self._git("write-tree").strip() != tree:
            # The index is another state's (a later snapshot of this store): the
            # snapshot's, with the stat data of what matches kept (-m).
            self._git("read-tree", "-m", tree)
        undo = self._put_back(self._differences(), index=False)
        for directory in sorted(self._directories() - had, key=len, reverse=True):  # the deepest first
            shutil.rmtree(self.workspace / directory)  # what is left in it is the run's too (rmtree follows no link)
        for directory in sorted(had):
            (self.workspace / directory).mkdir(parents=True, exist_ok=True)
        return undo

    # ---- kept change sets ------------------------------------------------------------

    def keep(self, pending: str, name: str) -> bool:
        """Keep run `pending`'s snapshot as the before-state of change set `name`, whose
        after-state the run recorded (`record`); False if it recorded none."""
        if self.tree(f"turns/{name}/after") is None:
            return False
        commit = self._git("rev-parse", "--verify", f"refs/genvisor/{pending}").strip()
        self._git(*_DURABLE, "update-ref", f"refs/genvisor/turns/{name}/before", commit)
        self.drop(pending)
        return True

    def record(self, pending: str, name: str, ref: str) -> WorkspaceChanges:
        """Capture the workspace as change set `name`'s after-state (its before-state is
        snapshot `pending`), and describe it."""
        before = self.tree(pending)
        if before is None:
            raise SnapshotError(f"no snapshot {pending!r}")
        after = self.snapshot(f"turns/{name}/after")
        return self.describe(before, after, ref)

    def kept(self, name: str, ref: str) -> WorkspaceChanges | None:
        """Change set `name` as it was kept, or None if there is none of that name."""
        before, after = self.tree(f"turns/{name}/before"), self.tree(f"turns/{name}/after")
        if before is None or after is None:
            return None
        return self.describe(before, after, ref)

    def revert(self, name: str, revert_name: str, ref: str) -> WorkspaceChanges | list[str]:
        """Put every path change set `name` changed back to its before-state, if each is
        still as the change set left it; else change nothing and return the paths that
        are not. The revert is itself kept, as change set `revert_name`."""
        before, after = self.tree(f"turns/{name}/before"), self.tree(f"turns/{name}/after")
        if before is None or after is None:
            raise SnapshotError(f"no change set {name!r}")
        turn = self.changes(before, after)
        now = self.snapshot(f"turns/{revert_name}/before")
        touched = {c.path for c in turn}
        conflicts = sorted(c.path for c in self.changes(after, now) if c.path in touched)
        if conflicts:
            self.drop(f"turns/{revert_name}/before")
            return conflicts
        # Each path is as the change set left it (the index holds the workspace since
        # the snapshot just taken): what it added goes, the rest is put back as before.
        self._put_back(turn)
        made = set(self._meta(f"turns/{name}/after").directories) - set(self._meta(f"turns/{name}/before").directories)
        for directory in sorted(made, key=len, reverse=True):
            try:
                (self.workspace / directory).rmdir()  # only if empty: what is in it now is not the change set's
            except OSError:
                pass
        for directory in sorted(set(self._meta(f"turns/{name}/before").directories) - set(self._meta(f"turns/{name}/after").directories)):
            (self.workspace / directory).mkdir(parents=True, exist_ok=True)
        return self.describe(now, self.snapshot(f"turns/{revert_name}/after"), ref)

    def describe(self, before: str, after: str, ref: str) -> WorkspaceChanges:
        """The change set from tree `before` to tree `after`: per path its change, sizes,
        sha256 and modes, and a bounded unified diff (binary files marked as such)."""
        raw = self.changes(before, after)
        if not raw:
            return WorkspaceChanges(ref=ref, workspace="unchanged")
        listed = raw[:MAX_LISTED_FILES]
        blobs = self._blob_facts({b for c in listed for b, m in ((c.blob_before, c.mode_before), (c.blob_after, c.mode_after))
                                  if b is not None and m != "160000"})
        files = []
        for c in listed:
            size_a, sha_a, binary_a = blobs.get(c.blob_before or "", (None, None, False))
            size_b, sha_b, binary_b = blobs.get(c.blob_after or "", (None, None, False))
            files.append(FileChange(c.path, c.change, size_a, size_b, sha_a, sha_b, c.mode_before, c.mode_after,
                                    binary_a or binary_b))
        diff, truncated = self._diff(before, after)
        return WorkspaceChanges(ref=ref, workspace="changed", files=files, files_total=len(raw), diff=diff,
                                diff_truncated=truncated or len(raw) > len(listed))

    # ---- helpers ---------------------------------------------------------------------

    def _differences(self) -> list[PathChange]:
        """What differs from the index to the workspace, read without writing a thing
        (no object, no index): the files changed or gone (stat data compared, content
        where stat cannot tell), and the files the index does not have."""
        changed = self._git("diff-files", "-z", "--raw", "--", *self._pathspec).split("\0")
        undo = []
        for meta, path in zip(changed[0::2], changed[1::2], strict=False):  # the output ends with a NUL
            if not meta:
                continue
            mode_index, mode_now, blob_index, _, status = meta.lstrip(":").split(" ")
            kind: Literal["modified", "deleted"] = "deleted" if status.startswith("D") else "modified"
            undo.append(PathChange(path, kind, mode_index, None if kind == "deleted" else mode_now, blob_index, None))
        added = self._git("ls-files", "-z", "--others", "--", *self._pathspec).split("\0")
        undo += [PathChange(path.rstrip("/"), "added", None, None, None, None) for path in added if path]
        return undo

    def _put_back(self, undo: list[PathChange], *, index: bool = True) -> list[PathChange]:
        """Put back what `undo` lists (changes from the tree to put back, to the
        workspace): into the index first (unless it holds them already), then the files."""
        # Only the entries that differ are rewritten: the index keeps the stat data of
        # all the others (a read-tree would forget them, and the next snapshot would
        # re-read the whole workspace: ≈0.75 s for 10 000 files instead of ≈40 ms).
        # Removals come first, so that a path turned from a file into a directory (or
        # back) is free for the entry put back there.
        entries = [f"0 {'0' * 40}\t{c.path}" for c in undo if c.change == "added"]
        entries += [f"{c.mode_before} {c.blob_before}\t{c.path}" for c in undo if c.change != "added"]
        if entries and index:
            self._git("update-index", "-z", "--index-info", stdin="\0".join(entries) + "\0")
        # A nested repository (mode 160000) is recorded by its commit, not its files:
        # one the run added is removed with the rest, one it changed cannot be put back.
        back = [c.path for c in undo if c.change != "added" and c.mode_before != "160000"]
        # The same order on disk.
        for change in undo:
            if change.change == "added":
                self._remove(change.path)
        if back:
            # -u: what is written gets fresh stat data, so that it is not read again either.
            self._git("checkout-index", "--force", "-u", "-z", "--stdin", stdin="\0".join(back) + "\0")
        return undo

    def _blob_facts(self, blobs: set[str]) -> dict[str, tuple[int, str, bool]]:
        """Size, sha256 and whether binary, of each blob (read in one `cat-file`)."""
        if not blobs:
            return {}
        order = sorted(blobs)
        process = subprocess.Popen(["git", "cat-file", "--batch"], env=self._env, cwd=self.workspace,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert process.stdin is not None and process.stdout is not None
        stdin = process.stdin

        def ask() -> None:
            with stdin:
                stdin.write("".join(f"{blob}\n" for blob in order).encode())

        # Asked from a thread: git answers while it reads, and a pipe holds 64 KiB.
        writer = threading.Thread(target=ask, daemon=True)
        writer.start()
        facts = {}
        for blob in order:
            header = process.stdout.readline().split()
            if len(header) != 3:
                raise SnapshotError(f"git cat-file could not read {blob}")
            size, left, digest, head = int(header[2]), int(header[2]), hashlib.sha256(), b""
            while left:
                chunk = process.stdout.read(min(left, 1 << 20))
                if not chunk:
                    raise SnapshotError("git cat-file ended early")
                if len(head) < _BINARY_SNIFF:
                    head += chunk[:_BINARY_SNIFF - len(head)]
                digest.update(chunk)
                left -= len(chunk)
            process.stdout.read(1)  # the newline after each object
            facts[blob] = (size, digest.hexdigest(), b"\0" in head)
        writer.join()
        process.wait()
        return facts

    def _diff(self, before: str, after: str) -> tuple[str, bool]:
        """git's unified diff of the two trees, cut at a file's boundary past
        MAX_DIFF_BYTES (read no further than that)."""
        process = subprocess.Popen(["git", "diff-tree", "-p", "-r", "--no-renames", "--no-color", "--no-ext-diff",
                                    before, after], env=self._env, cwd=self.workspace,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert process.stdout is not None
        text = process.stdout.read(MAX_DIFF_BYTES + 1)
        truncated = len(text) > MAX_DIFF_BYTES
        if truncated:
            process.kill()
            cut = text.rfind(b"\ndiff --git ", 0, MAX_DIFF_BYTES)
            text = text[:cut + 1] if cut >= 0 else text[:text.rfind(b"\n", 0, MAX_DIFF_BYTES) + 1]
        process.stdout.close()
        process.wait()
        return text.decode("utf-8", errors="replace"), truncated

    def _directories(self) -> set[str]:
        """The workspace's directories (relative paths), as git would see them: none
        inside a `.git`, none excluded, and no link followed."""
        found: set[str] = set()
        pending = [""]
        while pending:
            relative_root = pending.pop()
            with os.scandir(self.workspace / relative_root if relative_root else self.workspace) as entries:
                for entry in entries:
                    # is_dir without following: a link to a directory is a link (d_type, no stat)
                    if entry.name == ".git" or not entry.is_dir(follow_symlinks=False):
                        continue
                    relative = f"{relative_root}/{entry.name}" if relative_root else entry.name
                    if self._exclude_names and self._excluded(relative):
                        continue
                    found.add(relative)
                    pending.append(relative)
        return found

    def _excluded(self, relative: str) -> bool:
        name = relative.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatchcase(relative, pattern) or (not anchored and fnmatch.fnmatchcase(name, pattern))
                   for anchored, pattern in self._exclude_names)

    def _meta(self, name: str) -> _Meta:
        message = self._git("log", "-1", "--format=%B", f"refs/genvisor/{name}").strip()
        try:
            return _meta_decoder.decode(message)
        except msgspec.DecodeError:
            raise SnapshotError(f"snapshot {name!r} is not one of genvisor's") from None

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


def has_change_set(store: str, name: str) -> bool:
    """Whether change set `name` was kept (one stat, as `has_snapshot`)."""
    return os.path.exists(os.path.join(store, "refs", "genvisor", "turns", name, "before"))


def interrupted_reverts(store: str) -> list[str]:
    """The reverts begun in `store` and never finished (a before-state and no
    after-state: the daemon died in the middle of one)."""
    turns = os.path.join(store, "refs", "genvisor", "turns")
    if not os.path.isdir(turns):
        return []
    return sorted(name for name in os.listdir(turns) if name.startswith("rev_")
                  and os.path.exists(os.path.join(turns, name, "before")) and not os.path.exists(os.path.join(turns, name, "after")))


def undo_revert(store: str, workspace: str, revert: str) -> tuple[WorkspaceSettled, list[str]]:
    """Put the workspace back as it was before interrupted revert `revert` began, and
    let the revert go."""
    return _undo(store, workspace, f"turns/{revert}/before")


def _undo(store: str, workspace: str, name: str) -> tuple[WorkspaceSettled, list[str]]:
    """Put the workspace back as snapshot `name` has it, then let the snapshot go: what
    became of the workspace, and the paths put back (or what went wrong)."""
    try:
        snapshots = SnapshotStore.of(Path(store), Path(workspace), name)
        undone = snapshots.restore(name)
    except (SnapshotError, OSError) as exc:
        return "restore_failed", [str(exc)]
    snapshots.drop(name)
    return ("restored" if undone else "unchanged"), [change.path for change in undone]


def settle(store: str, workspace: str, run_id: str, *, completed: bool) -> tuple[WorkspaceSettled, list[str]] | None:
    """After a run's processes are gone: undo its changes unless it `completed` (then
    keep them as a change set, if it recorded one). None when the run took no snapshot
    (it made no change) or completed; else what became of the workspace, and the paths
    concerned (those put back, or what went wrong)."""
    if not (Path(store) / "HEAD").exists():
        return None
    plain = SnapshotStore(Path(store), Path(workspace))
    if plain.tree(run_id) is None:
        return None
    if completed:
        if not plain.keep(run_id, run_id):
            plain.drop(run_id)
        return None
    settled = _undo(store, workspace, run_id)
    if plain.tree(f"turns/{run_id}/after") is not None:
        plain.drop(f"turns/{run_id}/after")  # recorded by a run that then failed: not a change set
    return settled


def settle_run(store: str, workspace: str, run_id: str, completed: bool) -> tuple[WorkspaceSettled, list[str]] | None:
    """`settle`, its arguments all positional (as a node call passes them)."""
    return settle(store, workspace, run_id, completed=completed)


def kept_changes(store: str, workspace: str, name: str, ref: str) -> WorkspaceChanges | None:
    """Change set `name` as it was kept, or None if it was never kept (it changed nothing)."""
    if not has_change_set(store, name):
        return None
    return SnapshotStore(Path(store), Path(workspace)).kept(name, ref)


def revert_change_set(store: str, workspace: str, name: str, revert: str) -> WorkspaceChanges | list[str]:
    """Revert change set `name`, kept as change set `revert` (see SnapshotStore.revert)."""
    if not has_change_set(store, name):
        return WorkspaceChanges(ref=revert)  # it changed nothing: nothing to put back
    return SnapshotStore.of(Path(store), Path(workspace), f"turns/{name}/before").revert(name, revert, revert)


# What the daemon does to a workspace, by name: on a cluster, the agent of the node that
# holds the workspace does it (supervisor.node_agent), with these arguments, in order.
NODE_CALLS = {f.__name__: f for f in (settle_run, interrupted_reverts, undo_revert, kept_changes, revert_change_set)}
