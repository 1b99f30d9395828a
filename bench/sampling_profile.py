"""`python -m bench.sampling_profile [--seconds 8] [--clients 8] [--out DIR]`: where the
CPU of a generation goes, by process, sampled with py-spy (the `bench` extra installs it).

A daemon under closed-loop load is recorded with `py-spy record --subprocesses`
(the daemon, its zygote and every worker), and the samples are summed per process
role — daemon, zygote, worker — by the frames they were in (inclusive), idle waits
left out. Writes profile.txt (the summary) and profile.raw (collapsed stacks, for a
flame graph) to DIR. Needs ptrace rights over the daemon (root, or ptrace_scope 0).
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import Daemon, daemon_config
from bench.loops import closed_loop, genvisor_caller

# Frames that mean "waiting", not working.
IDLE = ("EpollIOManager.get_events", "EpollSelector.select", "WorkerThread._work", "Condition.wait", "Event.wait")
# Frames of the machinery every stack passes through; they say nothing.
NOISE = ("/trio/_core/_run.py", "<frozen runpy>", "threading.py", "outcome/_impl.py", "__main__.py", "zygote.py:1", "<module>")


def summarize_raw(raw: Path, top: int = 30) -> str:
    busy: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        depth = sum(1 for f in frames if f.startswith("process "))
        role = {1: "daemon", 2: "zygote"}.get(depth, "worker")
        code = [f for f in frames if not f.startswith(("process ", "thread "))]
        if code and code[-1].split(" (")[0] in IDLE:
            totals[role + " (idle)"] += int(count)
            continue
        totals[role] += int(count)
        for frame in set(code):
            if not any(n in frame for n in NOISE):
                busy[role][frame] += int(count)
    out = ["samples by process role: " + ", ".join(f"{k} {v}" for k, v in totals.most_common()), ""]
    for role in ("daemon", "zygote", "worker"):
        out.append(f"== {role}: {totals[role]} busy samples; inclusive share of them ==")
        for frame, n in busy[role].most_common(top):
            out.append(f"{100 * n / max(1, totals[role]):5.1f}%  {frame}")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.sampling_profile", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=Path("bench/results/profile"))
    args = parser.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "profile.raw"
    with tempfile.TemporaryDirectory(prefix="genvisor-profile-") as tmp, Daemon(Path(tmp), daemon_config()) as daemon:
        caller = genvisor_caller(daemon.endpoint, "prof")
        closed_loop(caller, args.clients, 1.0)  # warm
        recorder = subprocess.Popen(
            [spy, "record", "--pid", str(daemon.ps.pid), "--subprocesses", "--nonblocking", "--rate", str(args.rate),
             "--format", "raw", "--output", str(raw), "--duration", str(int(args.seconds) + 1)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        time.sleep(0.5)  # py-spy attaching: measuring, not waiting for a condition
        loop = closed_loop(caller, args.clients, args.seconds)
        _, err = recorder.communicate()
        if recorder.returncode != 0:
            print(err.decode(errors="replace"), file=sys.stderr)
            return 1
    heading = f"{loop.completed} generations in {loop.seconds:.1f} s ({loop.per_s:.0f}/s, {args.clients} clients) under py-spy"
    summary = heading + "\n\n" + summarize_raw(raw)
    (args.out / "profile.txt").write_text(summary)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
