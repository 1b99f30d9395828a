"""`python -m bench.workspace [--files N ...] [--repeat K] [--quick] [--json PATH]`:
issue 12's workspace scenario — what a workspace transaction costs a run, for
genvisor's snapshots (modes/workspace_snapshot.py) beside a plain `cp -a` and a
`git stash`-style snapshot, all three in the same run.

Per workspace size (1 000, 10 000 and 50 000 files by default; `--quick`: 1 000 and
10 000, 3 repeats), each mechanism is timed for:

* the cold snapshot: the first, with its store, repository or copy made from nothing;
* the warm snapshot when nothing changed — what most runs pay before their first
  effect: p50 and p90 of K (`--repeat`, 7), each under a new name, as runs take them;
* the snapshot after 100 files changed — a completed run's changes, seen by the next
  run's snapshot (`bench.workspace_options.change`: 100 files appended to; the first
  time also 10 added in new directories and 10 deleted): p50 of K;
* the restore of 100 changed files: that next run appends to the 100 files again
  (`change` once more: the 10 added are rewritten as they were), fails, and the
  workspace goes back to its snapshot — p50 of K. Every restore is checked: the
  workspace must hash as at the snapshot, path by path (files' bytes and executable
  bits, links, directories); a restore that does not is reported under the table;
* the snapshot right after that restore, nothing changed since: the run after a
  failed one (p50 of K).

The mechanisms (the copy takes 3 samples, not K, 1 when its cold copy took over 3 s,
and none after a restore: it copies everything every time, and more would add
minutes; its erratic seconds on this VM are kernel time):

* genvisor: `SnapshotStore.snapshot(name)` / `.restore(name)`, its store outside the
  workspace, refs written durably.
* cp -a: a snapshot is a full copy; a restore, with no record of what changed, empties
  the workspace and copies the snapshot back (there is no rsync on this machine).
* git stash: the workspace is its own repository (cold: `init`, `add -A`, `commit`);
  a snapshot is `add -A` + `stash create` (HEAD when nothing changed) + a ref of its
  name (what `stash store` does, for one name), written durably as genvisor's; a
  restore is `reset --hard` + `clean -fd` + `stash apply --index` of the snapshot
  (none when it is HEAD). git keeps no empty directory: one a run emptied is lost by
  such a restore (1 000 files here are one a directory: 10 deletions empty 10). It
  also rewrites the user's index, which genvisor never touches.

Files are 1–39 KB (≈20 KB, 10 000 files ≈ 190 MiB) up to 10 000 files, 1–7 KB above
(≈4 KB, 50 000 files ≈ 190 MiB too), so that the run stays within minutes and the
step from 10 000 to 50 000 is one of files alone. Absolute times on a 2-core VM are noisy: compare the ratios
(genvisor ÷ cp -a, genvisor ÷ stash). Last, issue 12's targets at 10 000 files:
warm snapshot p50 ≤ 20 ms, restore of 100 changed files p50 ≤ 50 ms — met or not.
Workspaces live in temp dirs under /tmp, removed after each size (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.stats import fmt, fmt_ratio, percentile, ratio
from bench.workspace_options import change, make_workspace, timed
from genvisor.modes.workspace_snapshot import SnapshotStore

SIZES = [1_000, 10_000, 50_000]
QUICK_SIZES = [1_000, 10_000]
REPEAT, QUICK_REPEAT = 7, 3
SMALL_FILES_ABOVE = 10_000  # more files than this: smaller ones (see the docstring)
TARGET_FILES = 10_000
TARGETS = [("warm snapshot p50", "warm_p50", 20.0), ("restore of 100 changed files p50", "restore_p50", 50.0)]
ROWS = [("cold", "cold"), ("warm p50", "warm_p50"), ("warm p90", "warm_p90"),
        ("after 100Δ p50", "after_change_p50"), ("restore 100Δ p50", "restore_p50"),
        ("after restore p50", "after_restore_p50")]
# As genvisor's refs (modes/workspace_snapshot.py): a snapshot survives a crash once taken.
COPY_SECONDS = 3  # a cold copy slower than this: the copy's figures are one sample each
DURABLE = ["-c", "core.fsync=objects,reference", "-c", "core.fsyncMethod=fsync"]


# ---- the mechanisms: begin() once, then snapshot / restore / drop by name ------------

class Genvisor:
    name = "genvisor"
    copies_everything = False

    def __init__(self, base: Path, workspace: Path) -> None:
        self.base, self.workspace = base, workspace

    def begin(self) -> None:
        self.store = SnapshotStore(self.base / "genvisor.git", self.workspace)

    def snapshot(self, name: str) -> None:
        self.store.snapshot(name)

    def restore(self, name: str) -> None:
        self.store.restore(name)

    def drop(self, name: str) -> None:
        self.store.drop(name)


class Copy:
    name = "cp -a"
    # Each snapshot copies everything, whatever changed: a few samples say what it
    # costs (one when a copy takes seconds: more would add minutes), and one right
    # after a restore is the same copy again (not taken).
    copies_everything = True

    def __init__(self, base: Path, workspace: Path) -> None:
        self.copies, self.workspace = base / "copies", workspace

    def begin(self) -> None:
        self.copies.mkdir()

    def snapshot(self, name: str) -> None:
        subprocess.run(["cp", "-a", str(self.workspace), str(self.copies / name)], check=True)

    def restore(self, name: str) -> None:
        # Emptied, not removed: a process whose cwd is the workspace keeps it.
        subprocess.run(["find", str(self.workspace), "-mindepth", "1", "-delete"], check=True)
        subprocess.run(["cp", "-a", f"{self.copies / name}/.", f"{self.workspace}/"], check=True)

    def drop(self, name: str) -> None:
        shutil.rmtree(self.copies / name)


class Stash:
    name = "git stash"
    copies_everything = False

    def __init__(self, base: Path, workspace: Path) -> None:
        self.workspace = workspace
        self.commits: dict[str, str] = {}  # snapshot name → its commit
        # The user's git settings play no part, as in genvisor's store.
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("GIT_")},
                    "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
                    "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
                    "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}

    def git(self, *args: str) -> str:
        return subprocess.run(["git", *args], cwd=self.workspace, env=self.env, check=True,
                              capture_output=True, text=True).stdout

    def begin(self) -> None:
        # `stash create` needs a HEAD: the workspace's files as its first commit.
        self.git("init", "-q")
        self.git("add", "-A")
        self.git("commit", "-q", "-m", "workspace")
        self.head = self.git("rev-parse", "HEAD").strip()

    def snapshot(self, name: str) -> None:
        self.git("add", "-A")  # untracked files too: `stash create` takes only tracked ones
        commit = self.git("stash", "create").strip() or self.head  # nothing to stash: HEAD is the snapshot
        # A named ref, not `stash store`: that one records nothing when the commit is
        # the one refs/stash already names (two snapshots of an unchanged workspace).
        self.git(*DURABLE, "update-ref", f"refs/snapshots/{name}", commit)
        self.commits[name] = commit

    def restore(self, name: str) -> None:
        self.git("reset", "-q", "--hard")
        self.git("clean", "-q", "-f", "-d")
        if self.commits[name] != self.head:
            self.git("stash", "apply", "-q", "--index", self.commits[name])

    def drop(self, name: str) -> None:
        self.git("update-ref", "-d", f"refs/snapshots/{name}")
        del self.commits[name]


# ---- workspaces ---------------------------------------------------------------------

def tree_manifest(root: Path) -> dict[str, str]:
    """Everything a restore must give back, path by path: each directory, each file's
    executable bit and hash of its bytes, each link's target (not followed); `.git`
    directories aside (the stash's repository is not the workspace's content)."""
    found = {}
    for directory, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".git"]
        for name in dirs + names:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                entry = f"link {os.readlink(path)}"
            elif stat.S_ISREG(info.st_mode):
                with open(path, "rb") as f:
                    entry = f"file {info.st_mode & stat.S_IXUSR:o} {hashlib.sha256(f.read()).hexdigest()}"
            else:
                entry = "dir"
            found[os.path.relpath(path, root)] = entry
    return found


def differences(expected: dict[str, str], actual: dict[str, str]) -> list[str]:
    """The paths that differ, each as `path (what it was → what it is)`."""
    def kind(entry: str | None) -> str:
        return "absent" if entry is None else entry.split(" ")[0]
    return [f"{path} ({kind(expected.get(path))} → {kind(actual.get(path))})"
            for path in sorted(expected.keys() | actual.keys()) if expected.get(path) != actual.get(path)]


# ---- measuring ------------------------------------------------------------------------

def measure_mechanism(mechanism, workspace: Path, files: int, repeat: int) -> dict:
    cold = timed(lambda: (mechanism.begin(), mechanism.snapshot("cold")))
    samples = min(repeat, 3 if cold < COPY_SECONDS * 1000 else 1) if mechanism.copies_everything else repeat
    warm = [warm_snapshot(mechanism, f"warm{i}") for i in range(samples)]
    runs = [failed_run(mechanism, workspace, files, f"run{i}") for i in range(samples)]
    after_change, restores, after_restore, wrong = ([run[k] for run in runs if run[k] is not None] for k in range(4))
    return {"samples": samples, "cold": cold, "warm": warm, "warm_p50": quantile(warm, 0.5), "warm_p90": quantile(warm, 0.9),
            "after_change": after_change, "after_change_p50": quantile(after_change, 0.5),
            "restore": restores, "restore_p50": quantile(restores, 0.5),
            "after_restore": after_restore, "after_restore_p50": quantile(after_restore, 0.5),
            "restores_checked": samples, "restores_exact": samples - len(wrong), "not_restored": wrong[0][:3] if wrong else []}


def quantile(samples: list[float], q: float) -> float:
    return percentile(sorted(samples), q)


def warm_snapshot(mechanism, name: str) -> float:
    took = timed(lambda: mechanism.snapshot(name))
    mechanism.drop(name)  # a settled run's snapshot goes: the next one is new
    return took


def failed_run(mechanism, workspace: Path, files: int, name: str) -> tuple:
    """A completed run's changes, then the next run's: its snapshot, its changes, its
    failure and restore (checked), and the snapshot of the run after it. Returns those
    times (ms; None: not taken) and what the restore got wrong (None: nothing)."""
    change(workspace, files)
    after_change = timed(lambda: mechanism.snapshot(name))
    expected = tree_manifest(workspace)
    change(workspace, files)  # the 100 files again (new bytes)
    restore = timed(lambda: mechanism.restore(name))
    # Reported, not fatal: a mechanism's limits are part of its figures.
    wrong = differences(expected, tree_manifest(workspace)) or None
    after_restore = None
    if not mechanism.copies_everything:
        # Nothing changed since the restore. Also what makes the next "after 100Δ"
        # follow a snapshot, not a restore.
        after_restore = warm_snapshot(mechanism, f"{name}-next")
    mechanism.drop(name)
    # Past the bytes the failed run wrote (genvisor's restore stored them): the next
    # "after 100Δ" must see bytes no snapshot has seen.
    change(workspace, files)
    return after_change, restore, after_restore, wrong


def measure(files: int, repeat: int) -> dict:
    """Every mechanism on one generated workspace of `files` files, one after another,
    in a temp dir removed after (also when interrupted)."""
    with tempfile.TemporaryDirectory(prefix="genvisor-bench-ws-", dir="/tmp") as tmp:
        base = Path(tmp)
        workspace = base / "ws"
        small = files > SMALL_FILES_ABOVE
        size = make_workspace(workspace, files, sizes=(1_000, 7_000) if small else (1_000, 39_000))
        figures = {"files": files, "mib": size / 2**20, "file_kb": "1-7" if small else "1-39", "repeat": repeat,
                   "mechanisms": {}}
        # The stash last: it makes the workspace a repository.
        for kind in (Genvisor, Copy, Stash):
            mechanism = kind(base, workspace)
            figures["mechanisms"][mechanism.name] = measure_mechanism(mechanism, workspace, files, repeat)
        figures["ratios"] = ratios(figures["mechanisms"])
        return figures


def ratios(mechanisms: dict) -> dict:
    ours = mechanisms["genvisor"]
    return {peer: {key: ratio(ours[key], mechanisms[peer][key]) for _, key in ROWS} for peer in ("cp -a", "git stash")}


def verdicts(results: list[dict]) -> list[tuple[str, float, float, bool | None]]:
    """Each target: (what, bound, figure at TARGET_FILES, met) — None if not measured."""
    at = next((r for r in results if r["files"] == TARGET_FILES), None)
    out = []
    for what, key, bound in TARGETS:
        value = at["mechanisms"]["genvisor"][key] if at else float("nan")
        out.append((what, bound, value, None if at is None else value <= bound))
    return out


# ---- printing -----------------------------------------------------------------------

def print_size(figures: dict) -> None:
    small = " (smaller than 1k/10k's: as many bytes as 10k, 5× the files)" if figures["file_kb"] == "1-7" else ""
    print(f"\n{figures['files']:,} files, {figures['mib']:.0f} MiB, {figures['file_kb']} KB a file{small}; "
          "ms, p50/p90 of n")
    print(f"  {'':22}" + "".join(f"{label:>18}" for label, _ in ROWS))
    for name, m in figures["mechanisms"].items():
        label = f"{name} (n={m['samples']})"
        print(f"  {label:22}" + "".join(f"{fmt(m[key], 1):>18}" for _, key in ROWS))
    for peer, r in figures["ratios"].items():
        print(f"  {'genvisor ÷ ' + peer:22}" + "".join(f"{fmt_ratio(r[key]):>18}" for _, key in ROWS))
    for name, m in figures["mechanisms"].items():
        if m["restores_exact"] < m["restores_checked"]:
            print(f"  ! {name}: {m['restores_checked'] - m['restores_exact']} of {m['restores_checked']} restores "
                  f"not byte for byte, e.g. {', '.join(m['not_restored'])}")
    sys.stdout.flush()


def print_curve(results: list[dict]) -> None:
    """Does a cost grow with the workspace, or with what changed? p50 ms by size."""
    print("\ncurve, p50 ms by workspace size (100 changed files throughout):")
    print(f"  {'files':28}" + "".join(f"{r['files']:>12,}" for r in results))
    print(f"  {'MiB':28}" + "".join(f"{r['mib']:>12.0f}" for r in results))
    for name in results[0]["mechanisms"]:
        for label, key in (("warm snapshot", "warm_p50"), ("after 100Δ", "after_change_p50"),
                           ("restore 100Δ", "restore_p50"), ("after restore", "after_restore_p50")):
            if all(math.isnan(r["mechanisms"][name][key]) for r in results):
                continue  # not taken (the copy after a restore)
            print(f"  {name + ' ' + label:28}" + "".join(f"{fmt(r['mechanisms'][name][key], 1):>12}" for r in results))


def print_verdicts(results: list[dict]) -> None:
    print()
    for what, bound, value, met in verdicts(results):
        status = "not measured (no 10,000-file run)" if met is None else f"{'met' if met else 'NOT met'}: {value:.1f} ms"
        print(f"target: genvisor {what} ≤ {bound:.0f} ms at {TARGET_FILES:,} files — {status}")


def without_nan(value):
    """NaN (a figure not measured) is no JSON: null."""
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nan(v) for v in value]
    return None if isinstance(value, float) and math.isnan(value) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.workspace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, nargs="+", help=f"workspace sizes (default {SIZES})")
    parser.add_argument("--repeat", type=int, help=f"samples per figure (default {REPEAT})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_SIZES}, {QUICK_REPEAT} repeats")
    parser.add_argument("--json", type=Path, help="also write the figures there, as JSON")
    args = parser.parse_args(argv)
    sizes = args.files or (QUICK_SIZES if args.quick else SIZES)
    repeat = args.repeat or (QUICK_REPEAT if args.quick else REPEAT)
    print("workspace scenario (issue 12): genvisor snapshots vs cp -a vs git stash, in one run\n"
          "after 100Δ: the snapshot after 100 files changed (the first time also 10 added, 10 deleted); restore 100Δ: "
          "100 files changed since the snapshot, put back (each checked byte for byte)")
    results = []
    try:
        for files in sizes:
            results.append(measure(files, repeat))
            print_size(results[-1])
    except KeyboardInterrupt:
        print("\ninterrupted (temp workspaces removed)", file=sys.stderr)
        return 130
    print_curve(results)
    print_verdicts(results)
    if args.json:
        targets = [{"target": what, "bound_ms": bound, "at_files": TARGET_FILES, "ms": value, "met": met}
                   for what, bound, value, met in verdicts(results)]
        args.json.write_text(json.dumps(without_nan({"sizes": results, "targets": targets}), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
