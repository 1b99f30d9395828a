"""`python -m bench.slow_readers [PYTHON ...]`: what clients that read late, or never,
cost a daemon — side by side for each genvisor install given (default: this one).

* never reads: a connection sends 150 `conversation` requests for a conversation
  holding a 4 MiB message and reads nothing (its own ZeroMQ takes next to nothing
  off the daemon: RCVHWM 1). Printed: how much the daemon's peak RSS grew, and how
  many of the 150 were answered once the client reads.
* reads late: a run streams 5 000 deltas to its owner, who reads nothing until the
  run is over. Printed: how many events and whether the terminal notification
  arrived, and the time to read them all.

To compare with the tree before a change:

    git archive REV | tar -x -C /tmp/before && python3 -m venv /tmp/venv-before
    /tmp/venv-before/bin/pip install /tmp/before
    python -m bench.slow_readers /tmp/venv-before/bin/python .venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run in the interpreter under test, so that it measures that install's client too.
_PROBE = r'''
import json, sys, time
import zmq
from genvisor.client import Client
from genvisor.ipc import codec
from genvisor.ipc.frames import GetConversation, Locator
from genvisor.types import GenerationEvent

endpoint, pid = sys.argv[1], int(sys.argv[2])

def peak_mib():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

def received(client):
    return getattr(client.status(), "requests_received", None)

with Client(endpoint, timeout_ms=60_000) as client:
    client.record_assistant_message("big", "m" * (4 << 20))
    before = peak_mib()
    start = received(client)
peer = zmq.Context.instance().socket(zmq.DEALER)
peer.setsockopt(zmq.RCVHWM, 1)
peer.setsockopt(zmq.RCVBUF, 64 * 1024)
peer.setsockopt(zmq.LINGER, 0)
peer.connect(endpoint)
for n in range(1, 151):
    peer.send(codec.encode_request(n, GetConversation(Locator(None, "big"))))
deadline = time.monotonic() + 30
with Client(endpoint) as client:
    if start is None:  # a daemon that does not count requests: give it the time
        time.sleep(8)
    else:
        while received(client) < start + 151 and time.monotonic() < deadline:
            pass
grew = peak_mib() - before
answered = 0
while peer.poll(5_000):
    peer.recv()
    answered += 1
peer.close(linger=0)

chunks = [f"d{n} " for n in range(5000)]
with Client(endpoint) as slow, Client(endpoint) as watcher:
    slow.send_user_message("late", "stream")
    ref = slow.generate_assistant_reply("late", events=True, backend_opts={"chunks": chunks})
    watcher.await_generation("late", ref)
    events, terminal, started = 0, False, time.perf_counter()
    while (note := slow.next_notification(timeout_ms=3_000)) is not None:
        if isinstance(note, GenerationEvent):
            events += 1
        else:
            terminal = True
            break
    read_s = time.perf_counter() - started
print(json.dumps({"grew_mib": round(grew), "answered": answered, "events": events, "terminal": terminal, "read_s": round(read_s, 2)}))
'''


def measure(python: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="genvisor-slow-") as tmp:
        endpoint = f"ipc://{tmp}/run/genvisor.sock"
        daemon = subprocess.Popen([python, "-m", "genvisor", "serve", "--endpoint", endpoint, "--state-dir", f"{tmp}/state"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
        try:
            _wait_until_listening(daemon, f"{tmp}/run/genvisor.sock")
            probe = subprocess.run([python, "-c", _PROBE, endpoint, str(daemon.pid)], capture_output=True, text=True,
                                   timeout=300, cwd=tmp, input="")
            if probe.returncode != 0:
                raise RuntimeError(probe.stderr)
            return json.loads(probe.stdout.strip().splitlines()[-1])
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)


def _wait_until_listening(daemon: subprocess.Popen, path: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(path) == 0:
                return
        try:
            daemon.wait(timeout=0.05)
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError(f"the daemon exited ({daemon.returncode}) at start")
    raise RuntimeError("the daemon did not listen in time")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.slow_readers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pythons", nargs="*", default=[sys.executable])
    args = parser.parse_args(argv)
    print(f"{'install':40} {'never reads: RSS grew':>22} {'answered':>9} {'late: events':>13} {'terminal':>9} {'read s':>7}")
    for python in args.pythons:
        m = measure(str(Path(python).absolute()) if "/" in python else python)
        print(f"{python:40} {m['grew_mib']:>18} MiB {m['answered']:>5}/150 {m['events']:>13} {str(m['terminal']):>9} {m['read_s']:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
