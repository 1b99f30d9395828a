"""A long fuzz run: many invalid frames at one real daemon, and what became of them.

    python -m bench.fuzz_frames [--n 100000] [--seed 1]

Starts its own daemon (scripted backend, ipc socket in a temp dir), seeds one
conversation, then sends N generated frames over a raw DEALER socket, one at a time,
and reads each answer. The frames are those of tests/test_fuzz_frames.py, from a
seeded random generator instead of hypothesis (fast, reproducible): random bytes,
empty, truncated valid frames, msgpack of the wrong shape, wrong protocol version,
unknown operations, wrong field types, missing and unknown fields, big strings under
the limit, extra parts, strings that are not UTF-8, ids that are not ints. Every one
is invalid by construction and checked so with the project's decoder before it is sent.

Prints one table: every frame should be answered BadRequest (with its request id
where one can be read), and nothing else should happen: no other answer, no silence,
no crash, no error in the daemon's log, no change of state. Exits 1 if anything did.
"""

from __future__ import annotations

import argparse
import collections
import random
import sys
import tempfile
import time
import typing
from pathlib import Path

import msgspec
import zmq

from bench.harness import Daemon, daemon_config
from genvisor.client import Client
from genvisor.errors import NotFound
from genvisor.ipc import codec, frames

V = frames.PROTOCOL_VERSION
PROBES = [[None, "fz-a"], ["fz-p", "fz-b"]]
KNOWN_OPS = {cls.__struct_config__.tag for cls in typing.get_args(frames.AnyRequest)}
VALID = [
    {"op": "ping"},
    {"op": "start_conversation", "id": "fz-a"},
    {"op": "send_user_message", "loc": PROBES[0], "content": "hello"},
    {"op": "configure_llm", "loc": PROBES[1], "model": "m"},
    {"op": "configure_skills", "loc": PROBES[0], "enabled": ["read_file"]},
    {"op": "configure_mode", "loc": PROBES[0], "mode": "coding", "force": False},
    {"op": "generate_assistant_reply", "loc": PROBES[0], "options": {"backend_opts": {"reply": "x"}}},
    {"op": "await_generation", "loc": PROBES[1], "ref": "gen_x", "timeout_ms": 5, "cancel_on_timeout": False},
    {"op": "send_and_generate", "loc": PROBES[0], "content": "hi"},
]
# (op, field, kinds of value that are wrong there); see _value for the kinds.
WRONG_TYPES = [
    ("start_conversation", "id", "int bool none list map bytes"),
    ("send_user_message", "content", "int bool none list map bytes"),
    ("send_user_message", "loc", "int str none map short_list int_pair"),
    ("configure_skills", "enabled", "str int none map"),
    ("configure_mode", "force", "int str none float"),
    ("generate_assistant_reply", "options", "str int list int_keys"),
    ("await_generation", "timeout_ms", "str bool float list"),
]
REQUIRED = [("start_conversation", "id"), ("send_user_message", "content"), ("configure_mode", "mode"), ("await_generation", "ref")]
# Category → weight. Big strings cost a copy of up to 2 MiB each: keep them rarer.
CATEGORIES = {"random_bytes": 1, "empty": 0.2, "truncated": 1, "wrong_shape": 1, "wrong_version": 1, "unknown_op": 1,
              "wrong_type": 1, "missing_field": 1, "unknown_field": 1, "huge_string": 0.1, "extra_parts": 1, "invalid_utf8": 1,
              "id_not_an_int": 1}


def frame(rid, req, v=V, **extra) -> bytes:
    return msgspec.msgpack.encode({"v": v, "id": rid, "req": req, **extra})


class BadFrames:
    """A seeded generator of invalid frames: each call returns (category, parts, the id
    the answer must carry or None when none can be read)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self._names = list(CATEGORIES)
        self._weights = list(CATEGORIES.values())

    def __call__(self) -> tuple[str, list[bytes], int | None]:
        category = self.rng.choices(self._names, self._weights)[0]
        return (category, *getattr(self, category)())

    # ---- values ----

    def _id(self) -> int:
        return self.rng.choice([self.rng.randrange(1 << 16), self.rng.randrange(-(1 << 63), 1 << 64)])

    def _text(self, n: int = 8) -> str:
        return "".join(self.rng.choice("abcxyz_é☃ 0") for _ in range(self.rng.randrange(n + 1)))

    def _value(self, kind: str | None = None, depth: int = 0):
        kinds = ["int", "bool", "none", "float", "str", "bytes"] + (["list", "map"] if depth < 3 else [])
        kind = kind or self.rng.choice(kinds)
        r = self.rng
        return {
            "int": lambda: r.randrange(-(1 << 63), 1 << 64),
            "bool": lambda: r.random() < 0.5,
            "none": lambda: None,
            "float": lambda: r.uniform(-1e9, 1e9),
            "str": lambda: self._text(),
            "bytes": lambda: r.randbytes(r.randrange(9)),
            "list": lambda: [self._value(depth=depth + 1) for _ in range(r.randrange(4))],
            "map": lambda: {self._text(5): self._value(depth=depth + 1) for _ in range(r.randrange(4))},
            "short_list": lambda: [None],
            "int_pair": lambda: [r.randrange(100), r.randrange(100)],
            "int_keys": lambda: {r.randrange(100): 1},
        }[kind]()

    def _valid(self) -> dict:
        return self.rng.choice(VALID)

    def _of(self, op: str) -> dict:
        return next(req for req in VALID if req["op"] == op)

    # ---- categories: each returns (parts, id) ----

    def random_bytes(self):
        return [self.rng.randbytes(self.rng.randrange(1, 513))], None

    def empty(self):
        return [b""], 0

    def truncated(self):
        rid = self._id()
        whole = frame(rid, self._valid())
        cut = self.rng.randrange(len(whole))
        return [whole[:cut]], rid if cut >= len(msgspec.msgpack.encode({"v": V, "id": rid})) else 0

    def wrong_shape(self):
        return [msgspec.msgpack.encode(self._value())], None

    def wrong_version(self):
        rid = self._id()
        v = self.rng.choice([0, 2, 99, -1, "1", None, 1.0])
        return [frame(rid, self._valid(), v=v)], rid

    def unknown_op(self):
        rid = self._id()
        op = self.rng.choice([self._text(30), self._value("int"), None])
        return ([frame(rid, {"op": op})], rid) if op not in KNOWN_OPS else self.unknown_op()

    def wrong_type(self):
        rid = self._id()
        op, field, kinds = self.rng.choice(WRONG_TYPES)
        return [frame(rid, {**self._of(op), field: self._value(self.rng.choice(kinds.split()))})], rid

    def missing_field(self):
        rid = self._id()
        op, field = self.rng.choice(REQUIRED)
        return [frame(rid, {k: v for k, v in self._of(op).items() if k != field})], rid

    def unknown_field(self):
        rid, name, value = self._id(), "x_" + self._text(6), self._value()
        if self.rng.random() < 0.5:
            return [frame(rid, {**self._valid(), name: value})], rid
        return [frame(rid, self._valid(), **{name: value})], rid

    def huge_string(self):
        rid, text = self._id(), "x" * self.rng.randrange(64 << 10, 2 << 20)
        req = self.rng.choice([{"op": text}, {**self._of("configure_skills"), "enabled": text}, {**self._of("send_user_message"), "x_pad": text}])
        return [frame(rid, req)], rid

    def extra_parts(self):
        rid = self._id()
        return [frame(rid, self._valid()), *(self.rng.randbytes(self.rng.randrange(65)) for _ in range(self.rng.randrange(1, 4)))], rid

    def invalid_utf8(self):
        rid, placeholder = self._id(), "\x00fuzz\x00"
        req = self.rng.choice([{**self._of("send_user_message"), "content": placeholder}, {**self._of("start_conversation"), "id": placeholder},
                               {**self._of("await_generation"), "ref": placeholder}, {**self._of("send_user_message"), "loc": [None, placeholder]}])
        bad = b"\xff" + self.rng.randbytes(len(placeholder) - 1)  # 0xFF is never UTF-8
        return [frame(rid, req).replace(placeholder.encode(), bad)], rid

    def id_not_an_int(self):
        return [frame(self.rng.choice([self._text(4), None, 1.5]), self._valid())], 0


def is_invalid(parts: list[bytes]) -> bool:
    if len(parts) > 1:
        return True
    try:
        codec.decode_request(parts[0])
    except codec.BadRequestFrame:
        return True
    return False


# ---- the daemon ------------------------------------------------------------------------


def fingerprint(client: Client) -> tuple:
    """What a frame could have changed: the seed conversation's journal, the run
    counters, and whether any probe conversation exists."""
    probes = []
    for loc in ("fz-a", "fz-b", ("fz-p", "fz-a"), ("fz-p", "fz-b")):
        try:
            client.conversation(loc)
            probes.append(True)
        except NotFound:
            probes.append(False)
    return client.conversation_thread_entries("fz-seed"), client.telemetry(), probes


class Peer:
    """A raw DEALER; replaced after a frame goes unanswered, so a late answer cannot
    be taken for the next frame's."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.socket = self._open()

    def _open(self) -> zmq.Socket:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        return sock

    def exchange(self, parts: list[bytes], timeout_ms: int) -> frames.Reply | frames.Failure | frames.Notify | None:
        self.socket.send_multipart(parts)
        if not self.socket.poll(timeout_ms):
            self.socket.close(linger=0)
            self.socket = self._open()
            return None
        return codec.decode_server_frame(self.socket.recv())

    def close(self) -> None:
        self.socket.close(linger=0)


# ---- the run ---------------------------------------------------------------------------


def run(n: int, seed: int, timeout_ms: int) -> int:
    counts = collections.Counter()
    categories = collections.Counter()
    generate = BadFrames(seed)
    with tempfile.TemporaryDirectory(prefix="genvisor-fuzz-") as tmp:
        # Rejections log at WARNING; errors still show.
        daemon = Daemon(Path(tmp), daemon_config(spares=1), log_level="ERROR").start()
        process, endpoint = daemon.process, daemon.endpoint
        try:
            with Client(endpoint, timeout_ms=30_000) as client:
                client.send_and_generate("fz-seed", "before the fuzz")
                before = fingerprint(client)
            peer = Peer(endpoint)
            started = time.perf_counter()
            while counts["sent"] < n:
                category, parts, request_id = generate()
                if not is_invalid(parts):
                    counts["generator_slips"] += 1  # a valid frame: never sent
                    continue
                categories[category] += 1
                counts["sent"] += 1
                answer = peer.exchange(parts, timeout_ms)
                if answer is None:
                    counts["no_answer"] += 1
                    if process.poll() is not None:  # the daemon is gone: the rest goes unanswered
                        counts["no_answer"] += n - counts["sent"]
                        break
                elif isinstance(answer, frames.Failure) and answer.error.code == "bad_request":
                    counts["bad_request"] += 1
                    if request_id is not None:
                        counts["id_readable"] += 1
                        counts["id_carried"] += answer.id == request_id
                else:
                    counts["other"] += 1
            elapsed = time.perf_counter() - started
            peer.close()
            if process.poll() is None:
                with Client(endpoint, timeout_ms=30_000) as client:
                    client.ping()
                    counts["state_changes"] += fingerprint(client) != before
        finally:
            if daemon.stop() != 0:  # died during the run, or a stop that was not clean
                counts["crashes"] = 1
        errors_logged = sum(" ERROR " in line for line in daemon.log().splitlines())

    rows = [
        ("frames sent", counts["sent"]),
        ("answered BadRequest", counts["bad_request"]),
        ("  carrying the request id, where readable", f"{counts['id_carried']}/{counts['id_readable']}"),
        ("other answers (expected 0)", counts["other"]),
        ("no answer (expected 0)", counts["no_answer"]),
        ("daemon crashes (expected 0)", counts["crashes"]),
        ("errors in the daemon's log (expected 0)", errors_logged),
        ("state changes (expected 0)", counts["state_changes"]),
        ("generator slips: valid frames not sent (expected 0)", counts["generator_slips"]),
        ("frames/s", f"{counts['sent'] / elapsed:,.0f}"),
    ]
    print(f"fuzz_frames: n={n} seed={seed}")
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("categories: " + ", ".join(f"{name} {categories[name]}" for name in CATEGORIES))
    clean = (counts["bad_request"] == counts["sent"] == n and counts["id_carried"] == counts["id_readable"]
             and not (counts["other"] or counts["no_answer"] or counts["crashes"] or errors_logged or counts["state_changes"]
                      or counts["generator_slips"]))
    return 0 if clean else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="frames to send")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout-ms", type=int, default=5_000, help="how long to wait for each answer")
    args = parser.parse_args()
    return run(args.n, args.seed, args.timeout_ms)


if __name__ == "__main__":
    sys.exit(main())
