"""`python -m bench.workspace_options [--files 1000 10000]`: what it costs, on this
machine, to snapshot a workspace before a run's first effect and to restore it after —
for the candidate mechanisms of workspace transactions, side by side in one run.

For each workspace size (files of 1–39 KB, ≈20 KB average: 10 000 files ≈ 190 MiB):

* `cp -a`: a full copy as the snapshot; restore = copy back what changed.
* git plumbing: an object store and an index of genvisor's own (GIT_DIR and
  GIT_INDEX_FILE under the state dir, GIT_WORK_TREE the workspace; never the user's
  `.git`): `add -A --force` + `write-tree` is the snapshot; restore = `read-tree` of the
  snapshot, `checkout-index` of the paths that changed, removal of the paths added.
* a stat walk in Python (os.scandir, no follow): the floor of any snapshot written in
  Python that must look at every file (hashing the changed ones comes on top).

Printed: the cold snapshot (nothing known yet), the warm one when nothing changed
(the case of most runs), the one after 100 files changed, 10 added and 10 deleted,
and the restore of those 120 paths — each the median of 5 where it repeats.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def make_workspace(root: Path, files: int, seed: int = 1, sizes: tuple[int, int] = (1_000, 39_000)) -> int:
    """`files` files of random text, `sizes` bytes each, 10 directories deep in 100; returns their bytes."""
    rng = random.Random(seed)
    total = 0
    for i in range(files):
        directory = root / f"d{i % 100:02d}" / f"s{(i // 100) % 10}"
        directory.mkdir(parents=True, exist_ok=True)
        size = rng.randint(*sizes)
        (directory / f"f{i}.txt").write_bytes(rng.randbytes(size // 2).hex().encode()[:size])
        total += size
    return total


def change(root: Path, files: int) -> None:
    """100 files appended to, 10 new directories with a file each, 10 files deleted."""
    step = max(1, files // 100)
    for i in range(0, step * 100, step):
        with open(root / f"d{i % 100:02d}" / f"s{(i // 100) % 10}" / f"f{i}.txt", "a") as f:
            f.write("CHANGED")
    for i in range(10):
        (root / f"new{i}").mkdir(exist_ok=True)
        (root / f"new{i}" / "n.txt").write_text("new")
    for i in range(1, step * 10, step):
        (root / f"d{i % 100:02d}" / f"s{(i // 100) % 10}" / f"f{i}.txt").unlink(missing_ok=True)


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


class Git:
    def __init__(self, store: Path, workspace: Path) -> None:
        subprocess.run(["git", "init", "-q", "--bare", str(store)], check=True)
        self.env = {**os.environ, "GIT_DIR": str(store), "GIT_INDEX_FILE": str(store / "genvisor-index"),
                    "GIT_WORK_TREE": str(workspace)}
        self.workspace = workspace

    def run(self, *args: str, stdin: str | None = None) -> str:
        return subprocess.run(["git", *args], env=self.env, check=True, capture_output=True, text=True, input=stdin,
                              cwd=self.workspace).stdout

    def snapshot(self) -> str:
        self.run("add", "-A", "--force", ".")
        return self.run("write-tree").strip()

    def restore(self, tree: str, now: str) -> None:
        changed = self.run("diff-tree", "-r", "--name-status", "--no-renames", tree, now).splitlines()
        back = [line.split("\t", 1)[1] for line in changed if line[0] in "MD"]
        added = [line.split("\t", 1)[1] for line in changed if line[0] == "A"]
        self.run("read-tree", tree)
        if back:
            self.run("checkout-index", "-f", "--stdin", stdin="\n".join(back) + "\n")
        for path in added:
            (self.workspace / path).unlink()


def stat_walk(root: Path) -> int:
    seen = 0
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                entry.stat(follow_symlinks=False)
                seen += 1
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
    return seen


def median_of(n: int, fn) -> float:
    return statistics.median(timed(fn) for _ in range(n))


def measure(files: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="genvisor-ws-") as tmp:
        base = Path(tmp)
        workspace = base / "ws"
        size = make_workspace(workspace, files)
        figures: dict[str, float] = {"MiB": size / 2**20}
        figures["cp -a: snapshot"] = timed(lambda: shutil.copytree(workspace, base / "copy", symlinks=True))
        git = Git(base / "store", workspace)
        figures["git: cold snapshot"] = timed(git.snapshot)
        figures["git: warm snapshot, nothing changed"] = median_of(5, git.snapshot)
        figures["python stat walk"] = median_of(5, lambda: stat_walk(workspace))
        before = git.snapshot()
        change(workspace, files)
        after: list[str] = []
        figures["git: snapshot after 120 changes"] = timed(lambda: after.append(git.snapshot()))
        figures["git: restore 120 paths"] = timed(lambda: git.restore(before, after[0]))
        assert git.snapshot() == before, "the restore did not give back the snapshot"
        change(workspace, files)
        figures["cp -a: restore 120 paths"] = timed(lambda: _copy_back(base / "copy", workspace))
        return figures


def _copy_back(copy: Path, workspace: Path) -> None:
    """What a copy-based restore must do without a record of what changed: compare
    everything, put back what differs, remove what is new (rsync when it is there)."""
    if shutil.which("rsync"):
        subprocess.run(["rsync", "-a", "--delete", f"{copy}/", f"{workspace}/"], check=True)
    else:
        shutil.rmtree(workspace)
        shutil.copytree(copy, workspace, symlinks=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workspace_options", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, nargs="+", default=[1_000, 10_000])
    args = parser.parse_args(argv)
    results = {files: measure(files) for files in args.files}
    rows = list(next(iter(results.values())))
    print(f"{'ms (MiB: workspace size)':40}" + "".join(f"{f'{files} files':>14}" for files in results))
    for row in rows:
        print(f"{row:40}" + "".join(f"{results[files][row]:>14.1f}" for files in results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
