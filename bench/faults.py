"""The long fault run: worker kills, daemon kills, cancels, runs that change their
workspace and do not complete, in a row — and what they cost.

    python -m bench.faults                      # 1000 worker kills, 200 daemon kills, 10000 cancels
    python -m bench.faults --worker-kills 50 --daemon-kills 10 --cancels 500 --workspace-faults 50   # a quick one

Each fault is checked, not just caused; the table counts what must stay zero:
daemon crashes, processes left behind, acknowledged messages lost, messages
duplicated, runs not resolved exactly once, cleanup failures. Frames are fuzzed by
`python -m bench.fuzz_frames`. Exits 1 if any count that must be zero is not.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.harness import Daemon, daemon_config, readable, wait_for_exit
from genvisor.errors import GenerationCanceled, LLMError


def leftovers(daemon: Daemon) -> int:
    """Processes under the daemon beyond its zygote and the zygote's spare workers."""
    return len(daemon.ps.children(recursive=True)) - len(daemon.workers()) - (daemon.zygote() is not None)


def wait_marker(fifo: Path, timeout_s: float = 10) -> bool:
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return readable(fd, timeout_s)
    finally:
        os.close(fd)


def restart_if_dead(daemon: Daemon, found: collections.Counter) -> None:
    if daemon.process.poll() is not None:
        found["unexpected_exits"] += 1
        daemon.start()


# ---- scenarios --------------------------------------------------------------------------


def worker_kills(daemon: Daemon, n: int, rng: random.Random) -> dict[str, float]:
    """kill -9 of the worker at a random point: in the model call, or in a tool."""
    found = collections.Counter()
    started = time.perf_counter()
    with daemon.client() as client:
        client.configure_skills("wk", ["write_file", "run_command"])
        for i in range(n):
            fifo = daemon.directory / f"wk{i}.fifo"
            os.mkfifo(fifo)
            tag = str(200000 + i)
            argv = ["sh", "-c", f"echo up > {fifo}; exec sleep {tag}"]
            if rng.random() < 0.5:
                options = {"backend_opts": {"spawn": argv, "delay_ms": 60_000}}
            else:
                script = [{"tool_calls": [{"name": "write_file", "arguments": {"path": "a", "content": "x"}}]},
                          {"tool_calls": [{"name": "run_command", "arguments": {"argv": argv, "timeout_ms": 60_000}}]},
                          {"text": "never"}]
                options = {"backend_opts": {"script": script}}
            client.send_user_message("wk", f"go {i}")
            before = client.conversation_messages("wk")
            ref = client.generate_assistant_reply("wk", **options)
            if not wait_marker(fifo):
                found["marker_missing"] += 1
                continue
            deadline = time.monotonic() + 10
            while (victim := _tagged(tag)) is None and time.monotonic() < deadline:
                pass  # its command line is briefly empty while it execs
            if victim is None:
                found["marker_missing"] += 1
                client.cancel_generation("wk", "victim not found")
                continue
            os.kill(os.getsid(victim.pid), signal.SIGKILL)  # the worker leads its run's session
            try:
                client.await_generation("wk", ref)
                found["not_failed"] += 1
            except LLMError as exc:
                found["typed_error"] += exc.message == "generation worker crashed"
            if client.conversation_messages("wk") != before:
                found["history_changed"] += 1
            os.unlink(fifo)
        daemon.wait_idle()
        found["cleanup_failures"] = client.status().cleanup_failures
    restart_if_dead(daemon, found)
    found["leftover_processes"] = leftovers(daemon) + sum(1 for i in range(n) if _tagged(str(200000 + i)))
    return {"kills": n, **found, "seconds": time.perf_counter() - started}


def _tagged(tag: str) -> psutil.Process | None:
    """The marker process: `sh -c "…; exec sleep TAG"` until its exec, `sleep TAG` after."""
    for proc in psutil.process_iter(["cmdline"]):
        if tag in " ".join(proc.info["cmdline"] or []).split():
            return proc
    return None


def daemon_kills(daemon: Daemon, n: int, rng: random.Random) -> dict[str, float]:
    """kill -9 of the daemon at a random point of a turn, then a restart: nothing
    acknowledged is lost, the run in flight ends once, nothing is duplicated."""
    acknowledged: list[str] = []
    completed = 0
    refs: list[str] = []
    found = collections.Counter()
    started = time.perf_counter()
    for i in range(n):
        with daemon.client() as client:
            client.send_user_message("dk", f"m{i}")
            acknowledged.append(f"m{i}")
            ref = client.generate_assistant_reply("dk", backend_opts={"delay_ms": rng.choice([0, 1, 5, 60_000])})
            refs.append(ref)
            if rng.random() < 0.5:
                try:
                    client.await_generation("dk", ref, timeout_ms=rng.choice([1, 200]), cancel_on_timeout=False)
                    completed += 1
                except Exception:  # noqa: BLE001 — still running: the kill finds it in flight
                    pass
        found["leftover_processes"] += len(wait_for_exit(daemon.kill(), timeout_s=10))
        daemon.start()
    with daemon.client() as client:
        messages = client.conversation_messages("dk")
        entries = client.conversation_thread_entries("dk")
        user = [m.content for m in messages if m.role == "user"]
        found["acknowledged_lost"] = len(set(acknowledged) - set(user))
        found["messages_duplicated"] = len(user) - len(set(user)) + sum(
            c - 1 for c in collections.Counter(m.entry_id for m in messages).values()
        )
        assistant = sum(1 for m in messages if m.role == "assistant")
        found["assistant_fewer_than_seen_completed"] = max(0, completed - assistant)
        started_runs = collections.Counter(e.data["run_id"] for e in entries if e.event == "run_started")
        finished_runs = collections.Counter(e.data["run_id"] for e in entries if e.event == "run_finished")
        found["runs_not_resolved_once"] = sum(1 for run in started_runs if finished_runs[run] != 1)
        found["resolved_daemon_restarted"] = sum(1 for e in entries if e.event == "run_finished" and e.data.get("reason") == "daemon_restarted")
        found["assistant_messages"] = assistant
        for ref in refs:  # every ref resolves, once, to a terminal outcome
            try:
                client.await_generation("dk", ref, timeout_ms=1_000)
            except (LLMError, GenerationCanceled):
                pass
            except Exception:  # noqa: BLE001
                found["refs_unresolved"] += 1
        found["seq_gaps"] = int([e.seq for e in entries] != list(range(1, len(entries) + 1)))
    return {"kills": n, **found, "seconds": time.perf_counter() - started}


def cancels(daemon: Daemon, n: int) -> dict[str, float]:
    """Cancels in a row: each run's whole process group reaped; fds and RSS flat."""
    process = daemon.ps
    found = collections.Counter()
    started = time.perf_counter()
    with daemon.client() as client:
        warm = min(200, n // 10)
        for i in range(n + warm):
            if i == warm:
                daemon.wait_idle()
                fds, rss = process.num_fds(), process.memory_info().rss
            client.send_user_message("cx", "m")
            ref = client.generate_assistant_reply("cx", backend_opts={"delay_ms": 60_000})
            client.cancel_generation("cx", "next")
            try:
                client.await_generation("cx", ref)
                found["not_canceled"] += 1
            except GenerationCanceled:
                pass
        daemon.wait_idle()
        status = client.status()
    restart_if_dead(daemon, found)
    return {
        "cancels": n, **found,
        "cleanup_failures": status.cleanup_failures,
        "cancel_reaped_p50_ms": status.cancel_reaped.p50_ms or 0.0,
        "cancel_reaped_p99_ms": status.cancel_reaped.p99_ms or 0.0,
        "leftover_processes": leftovers(daemon),
        "fds_growth": process.num_fds() - fds,
        "rss_growth_mib": round((process.memory_info().rss - rss) / 2**20, 2),
        "seconds": time.perf_counter() - started,
    }


MUST_BE_ZERO = (
    "not_failed", "history_changed", "marker_missing", "cleanup_failures", "leftover_processes",
    "acknowledged_lost", "messages_duplicated", "assistant_fewer_than_seen_completed", "runs_not_resolved_once",
    "refs_unresolved", "seq_gaps", "not_canceled", "fds_growth",
    "completed_unexpectedly", "restore_failed", "workspaces_differing",
)


def _manifest(root: Path) -> dict[str, tuple]:
    """Everything below `root` (links not followed): what each entry is and holds."""
    found: dict[str, tuple] = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            info = path.lstat()
            relative = str(path.relative_to(root))
            if path.is_symlink():
                found[relative] = ("link", os.readlink(path))
            elif path.is_dir():
                found[relative] = ("dir",)
            else:
                found[relative] = ("file", info.st_mode & 0o777, path.read_bytes())
    return found


def _effects(rng: random.Random) -> list[dict]:
    """Tool calls that change the workspace at random, through the file tools and commands."""
    calls = []
    for _ in range(rng.randint(1, 4)):
        n = rng.randint(0, 9)
        kind = rng.choice(["write", "edit", "rm", "mkdir", "mv", "chmod", "ln", "rmdir"])
        if kind == "write":
            calls.append({"name": "write_file", "arguments": {"path": rng.choice([f"f{n}.txt", f"sub/f{n}.txt", f"new{n}/deep/x"]),
                                                              "content": f"w{rng.random()}"}})
        elif kind == "edit":
            calls.append({"name": "edit_file", "arguments": {"path": "sub/f1.txt", "old": "one", "new": f"e{n}"}})
        else:
            shell = {"rm": f"rm -f f{n}.txt sub/f{n}.txt", "mkdir": f"mkdir -p made{n}/a/b", "mv": f"mv f{n}.txt moved{n}.txt",
                     "chmod": f"chmod 755 f{n}.txt", "ln": f"ln -sfn sub link{n}", "rmdir": "rm -rf sub/empty"}[kind]
            calls.append({"name": "run_command", "arguments": {"argv": ["sh", "-c", shell + " 2>/dev/null; true"]}})
    return calls


def workspace_faults(daemon: Daemon, n: int, rng: random.Random) -> dict[str, float]:
    """Runs that change their workspace at random and then do not complete — an error, a
    cancel, a deadline, a crashed worker: each workspace must come back as it was."""
    found = collections.Counter()
    started = time.perf_counter()
    base = daemon.directory / "workspaces"
    with daemon.client() as client:
        for i in range(n):
            workspace = base / f"w{i}"
            (workspace / "sub" / "empty").mkdir(parents=True)
            for k in range(10):
                (workspace / f"f{k}.txt").write_text(f"file {k}\n")
            (workspace / "sub" / "f1.txt").write_text("one two\n")
            (workspace / "run.sh").write_text("#!/bin/sh\n")
            (workspace / "run.sh").chmod(0o755)
            (workspace / "to-sub").symlink_to("sub")
            before = _manifest(workspace)
            conv = f"ws{i}"
            client.start_conversation(conv, metadata={"workspace": str(workspace)})
            client.configure_skills(conv, ["write_file", "edit_file", "run_command"])
            client.send_user_message(conv, "change it")
            ending = rng.choice(["error", "cancel", "deadline", "crash"])
            script = [{"tool_calls": [call]} for call in _effects(rng)]
            options: dict = {}
            if ending == "cancel":
                script.append({"tool_calls": [{"name": "run_command", "arguments": {"argv": ["sh", "-c", "touch .ready; exec sleep 60"]}}]})
            elif ending == "deadline":
                script.append({"tool_calls": [{"name": "run_command", "arguments": {"argv": ["sleep", "60"]}}]})
                options["timeout_ms"] = 300
            elif ending == "crash":
                script.append({"tool_calls": [{"name": "run_command", "arguments": {"argv": ["sh", "-c", "kill -9 $PPID"]}}]})
            ref = client.generate_assistant_reply(conv, backend_opts={"script": script}, **options)
            if ending == "cancel":
                deadline = time.monotonic() + 20
                while not (workspace / ".ready").exists() and time.monotonic() < deadline:
                    time.sleep(0.002)  # a yield, not the wait: the deadline bounds it
                client.cancel_generation(conv, "fault run")
            try:
                client.await_generation(conv, ref, timeout_ms=30_000)
                found["completed_unexpectedly"] += 1
            except (LLMError, GenerationCanceled):
                found[f"ended_{ending}"] += 1
            # The conversation's next run starts only once the last one's workspace is
            # settled: when it has answered, the restore (if any) is done.
            client.send_and_generate(conv, "and now?")
            notes = [e.data for e in client.conversation_thread_entries(conv) if e.event == "workspace_restored"]
            if not notes:
                found["ended_before_any_change"] += 1  # e.g. a deadline before its first tool call: nothing to undo
            elif notes[-1]["workspace"] == "restore_failed":
                found["restore_failed"] += 1
            if _manifest(workspace) != before:
                found["workspaces_differing"] += 1
            restart_if_dead(daemon, found)
    checked = {key: found[key] for key in ("workspaces_differing", "restore_failed")}  # printed, zero or not
    return {"runs": n, **found, **checked, "leftover_processes": leftovers(daemon), "seconds": time.perf_counter() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker-kills", type=int, default=1000)
    parser.add_argument("--daemon-kills", type=int, default=200)
    parser.add_argument("--cancels", type=int, default=10_000)
    parser.add_argument("--workspace-faults", type=int, default=1_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="genvisor-faults-") as tmp:
        daemon = Daemon(Path(tmp), daemon_config(spares=2, cancel_grace_ms=300, term_grace_ms=300, deadline_grace_ms=200)).start()
        try:
            results["worker kills"] = worker_kills(daemon, args.worker_kills, rng)
            results["cancels"] = cancels(daemon, args.cancels)
            results["workspace faults"] = workspace_faults(daemon, args.workspace_faults, rng)
            results["daemon kills"] = daemon_kills(daemon, args.daemon_kills, rng)
        finally:
            code = daemon.stop()
        results["daemon"] = {"final_exit_code": code}
    failed = False
    for scenario, figures in results.items():
        print(f"\n{scenario}")
        for key, value in figures.items():
            bad = (key in MUST_BE_ZERO or key in ("unexpected_exits", "final_exit_code")) and value > 0
            failed |= bad
            shown = f"{value:.2f}" if isinstance(value, float) else str(value)
            print(f"  {key:<40} {shown}{'   <-- expected 0' if bad else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
