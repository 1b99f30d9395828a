"""A long fuzz run of whole turns: generated options, model replies and tool arguments
through one real daemon, and what became of every request.

    python -m bench.fuzz_runs [--n 10000] [--seed 1] [--threads 4] [--with-known]
    python -m bench.fuzz_runs --known          # replay KNOWN_FAILURES, one by one

(Hypothesis comes with the test extras: `pip install -e '.[test]'`.)

Starts its own daemon (bench.harness: `genvisor serve` in a temp dir) with the
scripted backend and one `openai` backend per client thread, each pointing at its own
FakeOpenAI (tests/openai_server.py: a real HTTP server speaking the chat-completions
wire format), with the small graces of tests/conftest.py. Hypothesis generates the
cases (`@given` + `@seed`, generate phase only, no database: the same seed gives the
same cases); a few threads, each with its own Client, conversation per case and temp
workspace per case, drive them. Three families:

* options: generation options (known keys with values of any type, unknown keys,
  nested values), `configure_llm` (any backend/model, options of any JSON with
  timeout_ms/stream of any type), `configure_mode` (any mode, mode_state, force…),
  `configure_skills` (lists of anything), messages, stray awaits and cancels; a few
  slow ones (hangs and delays under short timeouts, await timeouts, cancels, stops);
* replies: the openai backend answering with generated bodies (a completion or a
  stream of chunks with fields replaced by any JSON value, any JSON at all, HTTP
  errors of generated statuses, valid text, tool calls with generated arguments,
  streams dropped midway, rare hangs), and scripted scripts of generated turns;
* tools: scripted turns whose tool calls carry generated arguments for every tool
  (any JSON, wrong types, NUL bytes, big strings, `..`, absolute paths, symlinks in
  and out, a FIFO, a loop), in a workspace that has all of those. `run_command`
  only ever gets harmless argv (`true`, `echo <text>`, `sh -c "exit 3"`…) or argv
  that cannot run (not a list of strings); its timeout_ms is anything.

Every request must be answered (a typed result or a typed GenvisorError: never
DaemonUnavailable, never InternalError, never another exception); every generation
must end with exactly one outcome (LLMResult, LLMError or GenerationCanceled, the same
when asked again, one run_finished per run_started in the journal); the daemon must
stay alive; at the end no worker is left beyond the zygote and its spares, no command
is left running, and nothing outside a workspace was written or read; then the daemon
is stopped and started again on the run's journal, and every case's conversation must
read back as it was. Prints the counts and exits 1 if any that must be zero is not.
What earlier runs found and is not fixed yet is in KNOWN_FAILURES (left out of the
generated cases unless --with-known).
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import os
import queue
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psutil
from hypothesis import HealthCheck, Phase, given, seed, settings, strategies as st

from bench.faults import leftovers
from bench.harness import REPO, Daemon
from genvisor.client import Client
from genvisor.errors import (
    AwaitTimeout,
    BadRequest,
    DaemonUnavailable,
    GenerationCanceled,
    GenvisorError,
    InternalError,
    InvalidLocator,
    LLMError,
)
from genvisor.types import LLMResult

if str(REPO / "tests") not in sys.path:
    sys.path.append(str(REPO / "tests"))  # tests/openai_server.py: the fake model server
from openai_server import FakeOpenAI, Response, drop_mid_stream, error, hang, raw, text, tool_calls  # noqa: E402

# What this run found that the daemon does not do as it must, kept until it is fixed.
# Each is replayed by `--known` (one fresh daemon per entry, the case as the generator
# writes them) and reported still failing or fixed. While they fail the generator
# leaves their pattern out, so that a run looks for new failures; `--with-known` puts
# it back. Found and fixed since, generated as any other case now:
# * message, conversation and configure_llm metadata/options with keys that are not
#   strings: accepted and journaled, they made every later answer about the
#   conversation undecodable and the journal unreadable at the next start (now
#   BadRequest at the edge, see ipc.codec);
# * an await whose timeout_ms is past 2**31 ms: the client's poll overflowed (now
#   waited in slices, see client.dealer).
KNOWN_FAILURES: list[dict[str, Any]] = []
GENERATE_KNOWN = False  # --with-known: generate the patterns of KNOWN_FAILURES too


FAMILIES = ("options", "replies", "tools")
TOOLS = ("read_file", "list_dir", "search_text", "write_file", "edit_file", "run_command")
FAKE = "@fake"  # the thread's own openai backend, substituted when the case runs
OUTSIDE, WS = "@outside", "@ws"  # absolute paths of the outside dir and of the workspace
CLIENT_TIMEOUT_MS = 30_000  # how long any request may wait for its answer
AWAIT_MS = 30_000  # a run's default deadline is 10 s (+ 0.2 s grace): this is ample
LOG_TAIL = 40


def daemon_config(fake_urls: list[str], spares: int) -> str:
    """tests/conftest.py's small graces, a 10 s default deadline, and the backends."""
    lines = ["[workers]", f"spares = {spares}", "cancel_grace_ms = 300", "term_grace_ms = 300", "deadline_grace_ms = 200",
             "[defaults]", "timeout_ms = 10000", "[journal]", 'backend = "sqlite"']
    for i, url in enumerate(fake_urls):
        lines += [f"[backends.fake{i}]", 'kind = "openai"', f'base_url = "{url}"', 'model = "fuzz-model"', "timeout_ms = 5000"]
    return "\n".join(lines) + "\n"


# ---- values ------------------------------------------------------------------------------
#
# Hypothesis draws the ends of a small integer range far more often than its middle (so
# `sampled_from` and `one_of` favour their first and last), and `one_of` drops repeated
# branches: choices and weights here go through one scrambled draw from 0..9999 instead.


def _scrambled(x: int) -> int:
    return (x * 7_919 + 4_999) % 10_000


def chance(p: float) -> st.SearchStrategy:
    """True with probability about `p`."""
    return st.integers(0, 9_999).map(lambda x: _scrambled(x) < p * 10_000)


def uniform(choices: list | tuple) -> st.SearchStrategy:
    """One of `choices`, about evenly."""
    return st.integers(0, 9_999).map(lambda x: choices[_scrambled(x) % len(choices)])


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """A draw from one of the strategies, picked in proportion to its weight."""
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, 9_999).flatmap(lambda x: table[_scrambled(x) % len(table)])


ODD_TEXT = ["", " ", "\x00", "a\x00b", "é☃𝄞", "\r\n", "null", "{}", "gen_x", "../x", "%s%n", "\u202e", "\ufeff"]
texts = weighted((4, st.text(max_size=12)), (1, uniform(ODD_TEXT)))
json_texts = st.text(max_size=12)
int64 = st.integers(-(2**63), 2**63 - 1)
int_edges = uniform([2**63, 2**64 - 1, -(2**63), 0, -1, 2**53 + 1])
huge = st.builds(lambda piece, n: piece * (n // len(piece.encode())), uniform(["x", "é", "☃", "\x00", "a\n"]),
                 st.integers(64 << 10, 256 << 10))
scalars = weighted((1, st.none()), (1, st.booleans()), (1, int64), (1, st.floats()), (2, texts))
json_scalars = weighted((1, st.none()), (1, st.booleans()), (1, int64), (1, st.floats(allow_nan=False, allow_infinity=False)),
                        (2, json_texts))
odd_keys = weighted((1, st.integers(-3, 3)), (1, st.none()), (1, st.floats(allow_nan=False)), (1, st.booleans()))
# Any value msgpack carries: of any type, with keys that are not strings now and then.
anything = st.recursive(
    weighted((8, scalars), (1, st.binary(max_size=8)), (1, int_edges)),
    lambda inner: weighted((3, st.lists(inner, max_size=4)), (3, st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                           (1, st.dictionaries(weighted((1, st.text(max_size=4)), (1, odd_keys)), inner, min_size=1, max_size=2))),
    max_leaves=10,
)
# What the client cannot even encode (a lone surrogate, an int past 64 bits): used in a
# few places only, as each refuses its whole request at the client.
unencodable = weighted((1, st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)), (1, uniform([2**64, -(2**63) - 1, 10**30])))
# Any JSON value (what a model server can send), lone surrogates included (escaped).
json_values = st.recursive(
    weighted((10, json_scalars), (1, uniform(["\ud800", "a\udcffb"]))),
    lambda inner: weighted((1, st.lists(inner, max_size=4)), (1, st.dictionaries(st.text(max_size=10), inner, max_size=4))),
    max_leaves=10,
)


def no_spawn(value: Any) -> bool:
    """Scripted backend_opts never start a generated program."""
    return not (isinstance(value, dict) and "spawn" in value)


def either(good: st.SearchStrategy, bad: st.SearchStrategy = anything) -> st.SearchStrategy:
    """Mostly (3 in 4) a value of the right type, else anything."""
    return weighted((3, good), (1, bad))


def mapping(known: dict[str, st.SearchStrategy], extra: st.SearchStrategy = anything) -> st.SearchStrategy:
    """A dict with some of the known keys and, one time in eight, unknown ones too (one
    unknown key fails a whole struct: more often, the known keys' values go untested)."""
    names = weighted((1, st.just("")), (7, st.text(min_size=1, max_size=8)))
    unknown = st.dictionaries(names.filter(lambda k: k not in known and k not in ("loc", "self")), extra, min_size=1, max_size=2)
    return st.builds(lambda fixed, more: {**more, **fixed}, st.fixed_dictionaries({}, optional=known),
                     weighted((7, st.just({})), (1, unknown)))


small_delays = weighted((6, st.integers(0, 20)), (1, st.integers(max_value=-1)),
                        (1, anything.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool) and v > 20))))
timeouts = weighted((4, st.integers(1, 86_400_000)), (1, uniform([0, -1, 86_400_001, 2**63 - 1])), (1, anything))
llm_categories = either(uniform(["config", "auth", "timeout", "provider", "transport", "canceled", "unknown"]))
scripted_error = mapping({"category": llm_categories, "message": either(texts), "retryable": either(st.booleans()),
                          "details": either(st.dictionaries(st.text(max_size=6), anything, max_size=3))})

# ---- tool arguments ----------------------------------------------------------------------

SEGMENTS = [".", "..", "sub", "sub/deep", "a.txt", "sub/b.md", "link_in", "link_out", "link_abs", "link_dir_out",
            "dangling", "loop", "fifo", "big.bin", "huge.bin", "latin1.txt", "nope", "ESCAPED-w", "", "new.txt"]
ABSOLUTE = ["/", "/etc/passwd", "/proc/self/environ", "/dev/zero", "/tmp/ESCAPED-abs", f"{OUTSIDE}/secret.txt",
            f"{OUTSIDE}/ESCAPED-abs", f"{WS}/a.txt", f"{WS}/ESCAPED-abs"]
paths = weighted(
    (5, st.lists(uniform(SEGMENTS), min_size=1, max_size=5).map("/".join)),
    (1, st.lists(uniform(SEGMENTS), min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts))),
    (1, uniform(ABSOLUTE)),
    (1, uniform(["a.txt\x00", "a\x00/b", "\ud800", "sub/\udcff", "x" * 300, "sub/" * 60 + "a", "~", "-", "...", "\\", "*"])),
    (1, st.text(max_size=12)),
)
contents = weighted((12, texts), (1, huge))
olds = weighted((1, uniform(["hello", "world", "hello again", "deep hello", "#", ""])), (1, texts))
# Only argv that harm nothing run; the rest cannot (not a non-empty list of strings, a NUL, a surrogate).
HARMLESS = [["true"], ["false"], ["pwd"], ["ls", "-la"], ["cat", "a.txt"], ["sh", "-c", "exit 3"],
            ["sh", "-c", "echo out; echo err >&2; exit 1"], ["sh", "-c", "head -c 200000 /dev/zero"],
            ["sh", "-c", "sleep 3 & echo left one behind"], ["sleep", "0.05"], ["/nonexistent/program"]]


def runnable(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(a, str) for a in value)


argvs = weighted(
    (4, uniform(HARMLESS)),
    (2, st.builds(lambda words: ["echo", *words], st.lists(contents, max_size=3))),
    (1, st.builds(lambda words: ["printf", "%s\\n", *words], st.lists(texts, max_size=3))),
    (2, uniform([[], "true", ["true", 1], [None], [["true"]], ["ech\x00o"], ["echo", "a\x00"], ["\ud800"], {"argv": ["true"]}])),
)


def tool_params(bad: st.SearchStrategy) -> dict[str, dict[str, st.SearchStrategy]]:
    """Each tool's parameters: mostly a value of the right type, sometimes `bad`."""
    argv = weighted((4, argvs), (1, bad.filter(lambda v: not runnable(v))))
    timeout = weighted((3, st.integers(1, 600_000)), (1, uniform([0, -1, 600_001, 2**63 - 1, 1.5, "1000", True])), (1, bad))
    return {
        "read_file": {"path": either(paths, bad)},
        "list_dir": {"path": either(paths, bad)},
        "search_text": {"text": either(olds, bad), "path": either(paths, bad)},
        "write_file": {"path": either(paths, bad), "content": either(contents, bad)},
        "edit_file": {"path": either(paths, bad), "old": either(olds, bad), "new": either(contents, bad)},
        "run_command": {"argv": argv, "timeout_ms": timeout},
    }


TOOL_PARAMS = {False: tool_params(anything), True: tool_params(json_values)}  # by json_only
RAW_ARGUMENTS = ["", "{", "[]", "5", "null", '"a.txt"', '{"path": 5}', '{"path": "a.txt"}', '{"path": "a.txt", "path": "../x"}',
                 "[" * 5000 + "]" * 5000, "1" * 5000, '{"path": "\\ud800"}', '{"argv": "true"}', "NaN", '{"text": "hello"}',
                 '{"argv": ["true"], "timeout_ms": 1e400}', '{"path": "a.txt"} trailing', '{"path": "link_out"}']


@functools.cache
def _tool_arguments(name: str, json_only: bool) -> st.SearchStrategy:
    table = TOOL_PARAMS[json_only]
    bad = json_values if json_only else anything
    shaped = mapping(table.get(name, table["read_file"]), extra=bad)
    return weighted((8, shaped), (1, uniform(RAW_ARGUMENTS)), (1, bad.filter(lambda v: not isinstance(v, dict))))


def tool_arguments(name: Any, json_only: bool = False) -> st.SearchStrategy:
    """Arguments for a call of `name`: its parameters with good or wrong values, unknown
    keys, a JSON text as a model sends it (valid or not), or not an object at all. With
    `json_only`, what a model server can send (JSON values only)."""
    return _tool_arguments(name if isinstance(name, str) and name in TOOL_PARAMS[json_only] else "read_file", json_only)


tool_names = weighted((8, uniform(TOOLS)), (1, uniform(["nope", "", "READ_FILE", "read_file "])))
odd_tool_names = weighted((3, tool_names), (1, anything))  # a name of the wrong type fails the whole script (config)


@st.composite
def tool_call(draw: st.DrawFn, json_only: bool = False) -> dict[str, Any]:
    name = draw(tool_names if not json_only else weighted((8, uniform(TOOLS)), (1, json_texts)))
    arguments = draw(tool_arguments(name, json_only))
    if not json_only and not isinstance(arguments, str):
        has_bytes = False
        try:
            as_text = json.dumps(arguments)
        except (TypeError, ValueError):  # bytes: the scripted backend fails such a run (unknown), so rarely
            has_bytes = True
            as_text = None if draw(chance(0.1)) else json.dumps(arguments, default=lambda v: v.decode("latin-1"))
        if as_text is not None and (has_bytes or not encodable(arguments) or draw(chance(0.25))):
            arguments = as_text  # as a model sends them, JSON text (a lone surrogate escaped: msgpack cannot carry it)
    return {"name": name, "arguments": arguments}


def encodable(value: Any) -> bool:
    try:
        msgspec.msgpack.encode(value)
        return True
    except (TypeError, ValueError, OverflowError):
        return False


tool_turn = st.builds(lambda calls, more: {**more, "tool_calls": calls}, st.lists(tool_call(), min_size=1, max_size=4),
                      st.fixed_dictionaries({}, optional={"text": texts}))
odd_call = st.fixed_dictionaries({"name": odd_tool_names, "arguments": anything})
odd_tool_turn = st.fixed_dictionaries({"tool_calls": st.lists(weighted((2, tool_call()), (1, odd_call), (1, anything)),
                                                              min_size=1, max_size=3)},
                                      optional={"text": either(texts)})
any_turn = weighted((3, tool_turn), (2, odd_tool_turn), (3, st.fixed_dictionaries({"text": either(contents)})),
                    (1, st.fixed_dictionaries({"tool_calls": anything})), (1, anything), (1, st.just({})))
scripts = weighted((4, st.lists(any_turn, max_size=4)), (1, anything))
scripted_opts = mapping({
    "reply": either(contents), "delay_ms": small_delays, "chunks": either(st.lists(texts, max_size=5)),
    "chunk_delay_ms": small_delays, "error": either(scripted_error), "script": scripts,
    "crash": weighted((1, uniform(["exit", "signal", "", "boom", "EXIT"])), (1, anything.filter(lambda v: v != "hang"))),
}).filter(no_spawn)

# ---- options -----------------------------------------------------------------------------

backends = either(uniform(["scripted", FAKE, "nope", "", "SCRIPTED"]))
request_options = weighted(
    (3, mapping({"extra_body": json_values, "top_p": anything, "n": anything, "stop": anything, "seed": anything,
                 "response_format": anything, "user": anything, "stream": anything, "tools": anything})),
    (1, st.builds(lambda key, v: {key: v}, uniform(["base_url", "api_key", "api_key_env", "extra_headers", "extra_query", "timeout"]),
                  anything)),
    (1, anything),
)
generation_options = mapping({
    "backend": backends, "provider": either(texts), "model": either(texts), "stream": either(st.booleans()),
    "timeout_ms": timeouts, "system_prompt": either(contents), "max_tokens": either(st.integers(-2, 10_000)),
    "temperature": either(st.floats()), "max_messages": either(st.integers(-2, 50)), "include_system": either(st.booleans()),
    "include_tool": either(st.booleans()), "request_id": either(texts), "metadata": anything,
    "request_options": request_options, "backend_opts": weighted((3, scripted_opts), (1, anything.filter(no_spawn))),
    "record_metadata": either(st.dictionaries(st.text(max_size=8), anything, max_size=3)), "events": either(st.booleans()),
})
llm_options = weighted((1, st.none()), (4, mapping({"timeout_ms": timeouts, "stream": either(st.booleans())})),
                       (2, anything), (1, st.builds(lambda v: {"timeout_ms": v}, unencodable)))
metadata = weighted((2, st.none()), (3, anything))
mode_states = weighted((1, st.none()), (4, mapping({"max_steps": either(st.integers(-1, 300)),
                                                    "max_tool_calls": either(st.integers(-1, 300)), "system_prompt": either(texts)})),
                       (1, anything))
skill_lists = weighted((4, st.lists(either(uniform([*TOOLS, " read_file ", "nope", ""])), max_size=8)), (1, anything))
maybe = weighted((1, st.none()), (1, texts), (1, anything))
NOTHING = {"backend_opts": {"reply": "ok"}}
TOOL_PROBE = {"backend_opts": {"script": [{"tool_calls": [{"name": "list_dir", "arguments": {}},
                                                           {"name": "run_command", "arguments": {"argv": ["true"]}}]},
                                          {"text": "done"}]}}

config_step = weighted(
    (2, st.builds(lambda b, p, m, o: ("configure_llm", {"backend": b, "provider": p, "model": m, "options": o}),
                  weighted((1, st.none()), (2, backends)), maybe, maybe, llm_options)),
    (2, st.builds(lambda m, s, r, f, c, i: ("configure_mode", {"mode": m, "mode_state": s, "reason": r, "force": f,
                                                              "cancel_reason": c, "cause_id": i}),
                  either(uniform(["coding", "nope", "", "Coding"])), mode_states, maybe, either(st.booleans()), maybe, maybe)),
    (2, st.builds(lambda s: ("configure_skills", s), skill_lists)),
    (2, st.builds(lambda c, m: ("send", {"content": c, "metadata": m}), either(contents, weighted((6, anything), (1, unencodable))),
                  metadata)),
    (1, st.builds(lambda c, m: ("record_assistant", {"content": c, "metadata": m}), either(texts), metadata)),
    (1, st.builds(lambda m: ("start_other", {"metadata": m}), metadata)),
    (1, st.builds(lambda r: ("cancel", {"reason": r}), either(texts))),
    (1, st.builds(lambda r, t, c: ("await_stray", {"ref": r, "timeout_ms": t, "cancel_on_timeout": c}),
                  either(uniform(["gen_x", "", "gen_" + "x" * 24])), either(st.integers(-1, 1000)), anything)),
)
mid_run_step = weighted((4, config_step), (1, st.just(("start", NOTHING))), (1, st.just(("stop", {}))))

# ---- model replies -----------------------------------------------------------------------


def _completion(message: dict[str, Any]) -> dict[str, Any]:
    return {"id": "chatcmpl-fz", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def _chunk(delta: dict[str, Any], finish: Any = None) -> dict[str, Any]:
    return {"id": "chatcmpl-fz", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def mutated(draw: st.DrawFn, template: Any, depth: int = 0) -> Any:
    """`template` with, here and there, a field replaced by any JSON value, removed, or added."""
    if isinstance(template, dict):
        out = {}
        for key, value in template.items():
            action = draw(uniform(["keep"] * 6 + ["replace", "drop", "deeper", "deeper"]))
            if action == "replace":
                out[key] = draw(json_values)
            elif action == "deeper" and depth < 4:
                out[key] = mutated(draw, value, depth + 1)
            elif action != "drop":
                out[key] = value
        if draw(chance(0.1)):
            out[draw(st.text(max_size=6))] = draw(json_values)
        return out
    if isinstance(template, list):
        items = [mutated(draw, item, depth + 1) for item in template]
        if draw(chance(0.15)):
            items = draw(st.permutations(items)) if items else items
        if draw(chance(0.15)):
            items.append(draw(json_values))
        return items
    return draw(json_values) if draw(chance(0.25)) else template


@st.composite
def model_message(draw: st.DrawFn) -> dict[str, Any]:
    calls = draw(st.lists(tool_call(json_only=True), max_size=3))
    if not calls:
        return {"role": "assistant", "content": draw(json_texts)}
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"call_{i}", "type": "function", "function": {"name": c["name"], "arguments": _as_json_text(c["arguments"])}}
        for i, c in enumerate(calls)]}


def _as_json_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


@st.composite
def stream_events(draw: st.DrawFn) -> list[Any]:
    message = draw(model_message())
    events = [_chunk({"role": "assistant", "content": ""})]
    if message.get("content"):
        text_ = message["content"]
        events += [_chunk({"content": text_[i:i + 4]}) for i in range(0, len(text_), 4)]
    for i, call in enumerate(message.get("tool_calls") or []):
        arguments = call["function"]["arguments"]
        events.append(_chunk({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                              "function": {"name": call["function"]["name"], "arguments": ""}}]}))
        events += [_chunk({"tool_calls": [{"index": i, "function": {"arguments": arguments[j:j + 16]}}]})
                   for j in range(0, min(len(arguments), 256), 16)]
    events.append(_chunk({}, finish="tool_calls" if message.get("tool_calls") else "stop"))
    events.append({**_chunk({}), "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
    return mutated(draw, events)


ERROR_STATUSES = weighted((3, uniform([400, 401, 403, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504])),
                          (2, st.integers(400, 599)), (1, uniform([200, 202])))


@st.composite
def model_reply(draw: st.DrawFn, stream: bool) -> tuple:
    """One answer of the fake server, as a descriptor (built into a Response when it runs)."""
    kind = draw(uniform(["body", "body", "body", "any", "error", "text", "tool_calls", "drop"]))
    if kind == "body":
        return ("raw", draw(stream_events()) if stream else mutated(draw, _completion(draw(model_message()))))
    if kind == "any":
        return ("raw", draw(st.lists(json_values, max_size=4)) if stream else draw(json_values))
    if kind == "error":
        return ("error", draw(ERROR_STATUSES), {"code": draw(st.one_of(st.none(), json_texts)), "message": draw(json_texts),
                                                 "type_": draw(json_texts)})
    if kind == "text":
        return ("text", draw(json_texts))
    if kind == "tool_calls":
        calls = draw(st.lists(tool_call(json_only=True), min_size=1, max_size=3))
        return ("tool_calls", [(c["name"], _as_json_text(c["arguments"])) for c in calls])
    return ("drop", draw(st.integers(0, 3)))


def build_response(descriptor: tuple) -> Response:
    kind = descriptor[0]
    if kind == "raw":
        return raw(descriptor[1])
    if kind == "error":
        return error(descriptor[1], **descriptor[2])
    if kind == "text":
        return text(descriptor[1])
    if kind == "tool_calls":
        return tool_calls(descriptor[1])
    if kind == "hang":
        return hang()
    return drop_mid_stream(descriptor[1])


# ---- cases -------------------------------------------------------------------------------


@st.composite
def options_case(draw: st.DrawFn) -> dict[str, Any]:
    steps = draw(st.lists(config_step, max_size=3))
    if draw(chance(0.1)):  # something arrives while a run is active
        started = draw(st.one_of(st.just({"backend_opts": {"delay_ms": 30}}), generation_options))
        steps += [("send", {"content": "hi"}), ("start", started), *draw(st.lists(mid_run_step, min_size=1, max_size=2)), ("settle", {})]
    else:
        options = draw(weighted((6, generation_options), (1, st.just(TOOL_PROBE)), (1, st.just(NOTHING))))
        steps += [("send", {"content": "hi"}), ("start", options), ("settle", {})]
    return {"family": "options", "kind": "options", "steps": steps, "replies": [("text", "ok")]}


@st.composite
def slow_case(draw: st.DrawFn) -> dict[str, Any]:
    """The few that wait: hangs and delays under short timeouts, await timeouts, cancels."""
    kind = draw(uniform(["hang", "delay", "fake_hang", "await_timeout", "cancel", "stop", "mode_force"]))
    timeout_ms = draw(st.integers(50, 400))
    long_run = {"backend_opts": {"delay_ms": 2_000}}
    steps: list[tuple] = [("send", {"content": "hi"})]
    replies: list[tuple] = []
    if kind == "hang":
        steps += [("start", {"backend_opts": {"crash": "hang"}, "timeout_ms": timeout_ms}), ("settle", {})]
    elif kind == "delay":
        steps += [("start", {"backend_opts": {"delay_ms": draw(st.integers(300, 1_500))}, "timeout_ms": timeout_ms}), ("settle", {})]
    elif kind == "fake_hang":
        replies = [("hang",)]
        steps += [("start", {"backend": FAKE, "timeout_ms": timeout_ms, "stream": draw(st.booleans())}), ("settle", {})]
    elif kind == "await_timeout":
        steps += [("start", long_run), ("await_short", {"timeout_ms": draw(st.integers(1, 100))}), ("settle", {})]
    elif kind == "cancel":
        steps += [("start", long_run), ("cancel", {"reason": draw(either(texts))}), ("settle", {})]
    elif kind == "stop":
        steps += [("start", long_run), ("stop", {}), ("settle", {})]
    else:
        steps += [("start", long_run), ("configure_mode", {"mode": "coding", "mode_state": draw(mode_states), "reason": None,
                                                           "force": True, "cancel_reason": draw(either(texts)), "cause_id": None}),
                  ("settle", {})]
    family = "replies" if kind == "fake_hang" else "options"
    return {"family": family, "kind": f"slow:{kind}", "steps": steps, "replies": replies}


@st.composite
def replies_case(draw: st.DrawFn) -> dict[str, Any]:
    if draw(chance(0.7)):
        stream = draw(st.booleans())
        replies = draw(st.lists(model_reply(stream), min_size=1, max_size=3))
        if draw(chance(0.5)):
            replies.append(("text", "done"))  # so that a run whose model called tools can end
        options = {"backend": FAKE, "stream": stream, **draw(st.fixed_dictionaries({}, optional={
            "timeout_ms": st.integers(500, 5_000), "max_tokens": st.integers(1, 100), "temperature": st.floats(0, 2),
            "events": st.booleans(), "system_prompt": json_texts}))}
        return {"family": "replies", "kind": "openai:" + ("stream" if stream else "plain"), "replies": replies,
                "steps": [("send", {"content": "hi"}), ("start", options), ("settle", {})]}
    opts = draw(st.one_of(st.fixed_dictionaries({"script": st.lists(any_turn, max_size=4)}),
                          st.fixed_dictionaries({"script": st.lists(any_turn, max_size=3)}, optional={"reply": either(texts),
                                                "chunks": either(st.lists(texts, max_size=4)), "error": either(scripted_error)}),
                          scripted_opts))
    return {"family": "replies", "kind": "scripted", "replies": [],
            "steps": [("send", {"content": "hi"}), ("start", {"backend": "scripted", "backend_opts": opts, "events": draw(st.booleans())}),
                      ("settle", {})]}


@st.composite
def tools_case(draw: st.DrawFn) -> dict[str, Any]:
    skills = draw(weighted((3, st.just(list(TOOLS))), (1, st.lists(uniform(TOOLS), unique=True))))
    turns = draw(st.lists(tool_turn, min_size=1, max_size=3))
    if draw(chance(0.1)):
        turns.append(draw(any_turn))
    script = [*turns, {"text": "done"}]
    options = {"backend": "scripted", "backend_opts": {"script": script}}
    if draw(chance(0.2)):
        options["timeout_ms"] = draw(st.integers(2_000, 20_000))
    return {"family": "tools", "kind": "tools", "replies": [],
            "steps": [("configure_skills", skills), ("send", {"content": "hi"}), ("start", options), ("settle", {})]}


@st.composite
def cases(draw: st.DrawFn) -> dict[str, Any]:
    if draw(chance(0.02)):
        return draw(slow_case())
    family = draw(uniform(["options"] * 4 + ["replies"] * 3 + ["tools"] * 3))
    return draw({"options": options_case(), "replies": replies_case(), "tools": tools_case()}[family])


def generate_cases(n: int, seed_: int, sink: Callable[[dict[str, Any]], None]) -> None:
    """Hand `n` generated cases to `sink`, in order: hypothesis's generate phase only, no
    database, seeded, so a seed always gives the same cases. Should a round end early
    (every example it drew overran its size budget), another seed goes on."""
    produced = 0
    attempt = 0
    while produced < n:
        remaining = n - produced

        @seed(seed_ + attempt * 1_000_003)
        @settings(max_examples=remaining, database=None, deadline=None, phases=[Phase.generate], derandomize=False,
                  suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
        @given(case=cases())
        def draw_cases(case: dict[str, Any]) -> None:
            nonlocal produced
            if produced < n:
                produced += 1
                sink(case)

        draw_cases()
        attempt += 1


# ---- running a case ----------------------------------------------------------------------


@dataclass
class Report:
    """What one case did: the answers to its requests, its runs' outcomes, and problems."""

    answers: collections.Counter = field(default_factory=collections.Counter)
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    messages: collections.Counter = field(default_factory=collections.Counter)  # LLMError's, digits masked
    problems: list[str] = field(default_factory=list)
    unanswered: int = 0
    internal: int = 0
    exceptions: int = 0
    client_refused: int = 0
    await_timeouts: int = 0
    generations: int = 0
    no_single_outcome: int = 0
    journal_mismatch: int = 0
    secrets_read: int = 0
    escapes: int = 0
    requests: int = 0


CANCEL_REASONS = ("await_timeout", "conversation_stopped", "cancel_requested", "daemon_shutdown", "daemon_restarted")


def label(exc: BaseException | None) -> str:
    if exc is None:
        return "ok"
    if isinstance(exc, LLMError):
        return f"LLMError:{exc.category}"
    if isinstance(exc, GenerationCanceled):
        return f"GenerationCanceled:{exc.reason if exc.reason in CANCEL_REASONS else '(a generated reason)'}"
    return type(exc).__name__


def outcome_of(value: Any, exc: BaseException | None) -> tuple[str, Any] | None:
    """A run's outcome, comparable; None if it is not one."""
    if exc is None and isinstance(value, LLMResult):
        return "LLMResult", (value.text, value.finish_reason)
    if isinstance(exc, LLMError):
        return f"LLMError:{exc.category}", exc.message
    if isinstance(exc, GenerationCanceled):
        return "GenerationCanceled", exc.reason
    return None


def substitute(value: Any, names: dict[str, str]) -> Any:
    """The case's placeholders (@fake, @outside, @ws) made this thread's and case's."""
    if isinstance(value, str) and value.startswith("@"):
        for token, real in names.items():
            if value == token or value.startswith(token + "/"):
                return real + value[len(token):]
        return value
    if isinstance(value, list):
        return [substitute(v, names) for v in value]
    if isinstance(value, tuple):
        return tuple(substitute(v, names) for v in value)
    if isinstance(value, dict):
        return {k: substitute(v, names) for k, v in value.items()}
    return value


def make_workspace(ws: Path) -> None:
    """Files, a directory tree, symlinks in and out (relative and absolute), a dangling
    one and a loop, a FIFO, text that is not UTF-8, and sparse files past the limits."""
    (ws / "sub" / "deep").mkdir(parents=True)
    (ws / "a.txt").write_text("hello\nworld\nhello again\n")
    (ws / "sub" / "b.md").write_text("# b\nworld\n")
    (ws / "sub" / "deep" / "c.txt").write_text("deep hello\n")
    (ws / "latin1.txt").write_bytes(b"caf\xe9 hello\n")
    with open(ws / "big.bin", "wb") as f:
        f.truncate(300 << 10)  # past read_file's 256 KiB
    with open(ws / "huge.bin", "wb") as f:
        f.truncate(9 << 20)  # past edit_file's 8 MiB
    os.symlink("a.txt", ws / "link_in")
    os.symlink("../../../outside/secret.txt", ws / "link_out")
    os.symlink("../../../outside", ws / "link_dir_out")
    os.symlink(str(ws.parent.parent.parent / "outside"), ws / "link_abs")
    os.symlink("nope", ws / "dangling")
    os.symlink("loop", ws / "loop")
    os.mkfifo(ws / "fifo")


class Run:
    """One daemon, a few threads each with a Client and a FakeOpenAI, and the totals."""

    def __init__(self, root: Path, threads: int, spares: int, log_level: str = "ERROR") -> None:
        self.root = root
        self.threads = threads
        self.secret = "SECRET-" + secrets.token_hex(16)
        self.outside = root / "outside"
        (self.outside / "dir").mkdir(parents=True)
        (self.outside / "secret.txt").write_text(self.secret + "\n")
        (root / "cases").mkdir()
        self.outside_before = self._outside_snapshot()
        self.fakes = [FakeOpenAI().__enter__() for _ in range(threads)]
        self.daemon = Daemon(root / "daemon", daemon_config([f.base_url for f in self.fakes], spares), log_level=log_level)
        self.lock = threading.Lock()
        self.restart_lock = threading.Lock()
        self.cases = collections.Counter()  # by family
        self.kinds = collections.Counter()
        self.answers = collections.Counter()
        self.outcomes = collections.Counter()  # by family and outcome
        self.messages = collections.Counter()  # by family and LLMError message
        self.totals = collections.Counter()
        self.tool_calls = collections.Counter()
        self.failures: list[dict[str, Any]] = []
        self.exits: list[str] = []
        self.progress = False
        self.journals: dict[str, str] = {}  # conversation → digest of its journal when its case ended
        self.began = time.perf_counter()

    # ---- lifecycle ----

    def start(self) -> None:
        self.daemon.start()

    def close(self) -> int:
        code = self.daemon.stop()
        for fake in self.fakes:
            fake.__exit__(None, None, None)
        return code

    def alive(self) -> bool:
        """Whether the daemon is running; if it is not, the exit is counted and it is
        started again (once, whichever thread sees it first)."""
        if self.daemon.process.poll() is None:
            return True
        with self.restart_lock:
            if self.daemon.process.poll() is not None:
                code = self.daemon.process.returncode
                tail = "\n".join(self.daemon.log().splitlines()[-LOG_TAIL:])
                self.exits.append(f"exit code {code}:\n{tail}")
                self.daemon.start()
        return False

    # ---- the run ----

    def drive(self, source: Callable[[Callable[[dict[str, Any]], None]], None]) -> None:
        """Run every case `source` hands over, on the threads (a bounded queue between)."""
        work: queue.Queue = queue.Queue(maxsize=4 * self.threads)
        index = iter(range(1 << 62))
        failed: list[BaseException] = []

        def produce() -> None:
            try:
                source(lambda case: work.put((next(index), case)))
            except BaseException as exc:  # noqa: BLE001 — reported below, the consumers told to stop
                failed.append(exc)
            finally:
                for _ in range(self.threads):
                    work.put(None)

        def consume(slot: int) -> None:
            with Client(self.daemon.endpoint, timeout_ms=CLIENT_TIMEOUT_MS) as client:
                while (item := work.get()) is not None:
                    number, case = item
                    self.run_case(client, slot, number, case)

        producer = threading.Thread(target=produce, name="fuzz-cases")
        consumers = [threading.Thread(target=consume, args=(slot,), name=f"fuzz-{slot}") for slot in range(self.threads)]
        producer.start()
        for thread in consumers:
            thread.start()
        for thread in [producer, *consumers]:
            thread.join()
        if failed:
            raise failed[0]

    def run_case(self, client: Client, slot: int, number: int, case: dict[str, Any]) -> Report:
        report = Report()
        conv = f"fz{number}"
        case_dir = self.root / "cases" / conv
        ws = case_dir / "ws"
        make_workspace(ws)
        fake = self.fakes[slot]
        names = {FAKE: f"fake{slot}", OUTSIDE: str(self.outside), WS: str(ws)}
        with fake._lock:  # what the last case left: replies it did not take, requests recorded
            fake._queue.clear()
            fake.requests.clear()
            fake.headers.clear()
        for descriptor in case["replies"]:
            fake.reply(build_response(descriptor))
        self.ask(report, "start_conversation", client.start_conversation, conv, metadata={"workspace": str(ws)})
        refs: list[str] = []  # started, not yet settled
        for op, args in substitute(case["steps"], names):
            if op == "start":
                opts = {k: v for k, v in args.items() if k not in ("loc", "self")}
                value, exc = self.ask(report, "generate_assistant_reply", client.generate_assistant_reply, conv, **opts)
                if exc is None:
                    refs.append(value)
                    report.generations += 1
                    self._count_tool_calls(opts)
            elif op == "settle":
                for ref in refs:
                    self.settle(report, client, conv, ref)
                refs.clear()
            elif op == "await_short":
                if refs:
                    value, exc = self.ask(report, "await_generation(short)", client.await_generation, conv, refs[-1], args["timeout_ms"])
                    report.await_timeouts += isinstance(exc, AwaitTimeout)
            else:
                self.step(report, client, conv, op, args)
        for ref in refs:
            self.settle(report, client, conv, ref)
        self.check_journal(report, client, conv)
        if case["family"] != "options":
            self.check_secrets(report, client, conv)
        self.check_case_dir(report, case_dir)
        while client.next_notification(0) is not None:
            pass  # events of runs that asked for them
        if not self.alive():
            report.problems.append("the daemon exited during this case (or one running beside it)")
        shutil.rmtree(case_dir, ignore_errors=True)
        self.merge(number, case, report)
        return report

    def step(self, report: Report, client: Client, conv: str, op: str, args: Any) -> None:
        if op == "configure_llm":
            self.ask(report, op, client.configure_llm, conv, args["backend"], provider=args["provider"], model=args["model"],
                     options=args["options"])
        elif op == "configure_mode":
            self.ask(report, op, client.configure_mode, conv, args["mode"], args["mode_state"], reason=args["reason"],
                     force=args["force"], cancel_reason=args["cancel_reason"], cause_id=args["cause_id"])
        elif op == "configure_skills":
            self.ask(report, op, client.configure_skills, conv, args)
        elif op == "send":
            self.ask(report, "send_user_message", client.send_user_message, conv, args["content"], args.get("metadata"))
        elif op == "record_assistant":
            self.ask(report, "record_assistant_message", client.record_assistant_message, conv, args["content"], args["metadata"])
        elif op == "start_other":
            self.ask(report, "start_conversation(other)", client.start_conversation, conv + "-other", metadata=args["metadata"])
        elif op == "cancel":
            self.ask(report, "cancel_generation", client.cancel_generation, conv, args["reason"])
        elif op == "stop":
            self.ask(report, "stop_conversation", client.stop_conversation, conv)
        elif op == "await_stray":
            self.ask(report, "await_generation(stray)", client.await_generation, conv, args["ref"], args["timeout_ms"],
                     args["cancel_on_timeout"])
        elif op != "await_short":
            raise ValueError(f"unknown step {op!r}")

    def ask(self, report: Report, name: str, call: Callable, *args: Any, **kwargs: Any) -> tuple[Any, BaseException | None]:
        """One request: its answer counted, and anything but a typed answer a problem."""
        report.requests += 1
        value, exc = None, None
        try:
            value = call(*args, **kwargs)
        except GenvisorError as caught:
            exc = caught
        except Exception as caught:  # noqa: BLE001 — neither a result nor a typed error: counted
            exc = caught
            report.exceptions += 1
            report.problems.append(f"{name}: {type(caught).__name__} raised in the client: {traceback.format_exc(limit=4)}")
        if isinstance(exc, DaemonUnavailable):
            report.unanswered += 1
            report.problems.append(f"{name}: unanswered ({exc})")
        elif isinstance(exc, InternalError):
            report.internal += 1
            report.problems.append(f"{name}: {exc}")
        elif isinstance(exc, (BadRequest, InvalidLocator)) and _refused_locally(exc):
            report.client_refused += 1
        report.answers[f"{name}: {label(exc)}{' (client)' if exc is not None and _refused_locally(exc) else ''}"] += 1
        return value, exc

    def settle(self, report: Report, client: Client, conv: str, ref: str) -> None:
        """The run's one outcome: awaited (an await timeout cancels it, so the next await
        has its outcome), then asked again: the same."""
        value, exc = self.ask(report, "await_generation", client.await_generation, conv, ref, AWAIT_MS)
        if isinstance(exc, AwaitTimeout):
            report.await_timeouts += 1
            value, exc = self.ask(report, "await_generation", client.await_generation, conv, ref, AWAIT_MS)
        outcome = outcome_of(value, exc)
        if outcome is None:
            report.no_single_outcome += 1
            report.problems.append(f"generation {ref} has no outcome: {label(exc)} {exc or value!r:.300}")
            return
        report.outcomes[outcome[0] if outcome[0] != "GenerationCanceled" else label(exc)] += 1
        if isinstance(exc, LLMError):
            report.messages[f"{exc.category}: {re.sub(r'[0-9]+', '#', exc.message)[:70]}"] += 1
        again = outcome_of(*self.ask(report, "await_generation(again)", client.await_generation, conv, ref, 1_000))
        if again != outcome:
            report.no_single_outcome += 1
            report.problems.append(f"generation {ref}: {outcome!r:.200}, then {again!r:.200}")

    def check_journal(self, report: Report, client: Client, conv: str) -> None:
        entries, exc = self.ask(report, "conversation_thread_entries", client.conversation_thread_entries, conv)
        if exc is not None:
            return
        with self.lock:
            self.journals[conv] = hashlib.sha256(msgspec.msgpack.encode(entries)).hexdigest()
        started = collections.Counter(e.data.get("run_id") for e in entries if e.event == "run_started")
        finished = collections.Counter(e.data.get("run_id") for e in entries if e.event == "run_finished")
        if len(started) != report.generations or any(finished[run] != 1 for run in started) or set(finished) - set(started):
            report.journal_mismatch += 1
            report.problems.append(f"journal: {report.generations} runs started by this case, run_started {dict(started)}, "
                                   f"run_finished {dict(finished)}")

    def check_secrets(self, report: Report, client: Client, conv: str) -> None:
        messages, exc = self.ask(report, "conversation_messages", client.conversation_messages, conv)
        if exc is None and any(self.secret in m.content for m in messages):
            report.secrets_read += 1
            report.problems.append("a tool result holds the text of a file outside the workspace")

    def check_case_dir(self, report: Report, case_dir: Path) -> None:
        """Nothing but the workspace in the case's directory (`..` from the workspace)."""
        others = sorted(p.name for p in case_dir.iterdir() if p.name != "ws")
        if others:
            report.escapes += 1
            report.problems.append(f"written outside the workspace: {others}")

    def _count_tool_calls(self, opts: dict[str, Any]) -> None:
        script = opts.get("backend_opts", {}).get("script") if isinstance(opts.get("backend_opts"), dict) else None
        for turn in script if isinstance(script, list) else []:
            for call in (turn.get("tool_calls") or []) if isinstance(turn, dict) and isinstance(turn.get("tool_calls"), list) else []:
                if isinstance(call, dict):
                    name = call.get("name")
                    with self.lock:
                        self.tool_calls[name if isinstance(name, str) and name in TOOLS else "(other name)"] += 1

    def merge(self, number: int, case: dict[str, Any], report: Report) -> None:
        with self.lock:
            self.cases[case["family"]] += 1
            self.kinds[case["kind"]] += 1
            self.answers.update(report.answers)
            for outcome, count in report.outcomes.items():
                self.outcomes[(case["family"], outcome)] += count
            for message, count in report.messages.items():
                self.messages[(case["family"], message)] += count
            for name in ("unanswered", "internal", "exceptions", "client_refused", "await_timeouts", "generations",
                         "no_single_outcome", "journal_mismatch", "secrets_read", "escapes", "requests"):
                self.totals[name] += getattr(report, name)
            if report.problems:
                self.failures.append({"number": number, "problems": report.problems, "case": case})
            done = sum(self.cases.values())
            if self.progress and done % 1000 == 0:
                print(f"  … {done} cases, {len(self.failures)} failing, {time.perf_counter() - self.began:.0f} s", file=sys.stderr, flush=True)

    # ---- at the end ----

    def _outside_snapshot(self) -> list[tuple]:
        found = []
        for path in sorted(self.outside.rglob("*")):
            info = path.lstat()
            found.append((str(path.relative_to(self.outside)), info.st_size, info.st_mtime_ns))
        return found

    def final_checks(self) -> dict[str, int]:
        """Once idle: workers and commands left, cleanup failures, writes outside."""
        self.daemon.wait_idle()
        with Client(self.daemon.endpoint, timeout_ms=CLIENT_TIMEOUT_MS) as client:
            status = client.status()
        cases_dir = str(self.root / "cases")
        commands = 0
        for proc in psutil.process_iter(["cwd"]):
            if (proc.info["cwd"] or "").startswith(cases_dir):
                commands += 1
        escaped = [p for p in (self.root / "cases").iterdir() if not p.name.startswith("fz")]
        for directory in (self.root, self.root.parent, Path("/")):
            escaped += [p for p in directory.iterdir() if p.name.startswith("ESCAPED")]
        escaped += [p for p in self.root.iterdir() if p.name not in ("cases", "outside", "daemon")]
        changed = self._outside_snapshot() != self.outside_before
        return {
            "leftover_workers": leftovers(self.daemon),
            "leftover_commands": commands,
            "cleanup_failures": status.cleanup_failures,
            "written_outside_at_end": len(escaped) + int(changed),
        }

    def restart_check(self) -> dict[str, Any]:
        """Stop the daemon, start it again on the run's journal, and read every case's
        conversation back: it starts, and each journal is as it was before the stop.
        Read again once the daemon is idle: a run's journal may still grow after its
        outcome was given (the note that its workspace was undone comes after its
        processes are gone), and a run's slot is held until then."""
        self.daemon.wait_idle()
        with Client(self.daemon.endpoint, timeout_ms=CLIENT_TIMEOUT_MS) as client:
            for conv in self.journals:
                try:
                    entries = client.conversation_thread_entries(conv)
                except Exception:  # noqa: BLE001 — its digest from its case stands (and is checked)
                    continue
                self.journals[conv] = hashlib.sha256(msgspec.msgpack.encode(entries)).hexdigest()
        found: dict[str, Any] = {"stop_code": self.daemon.stop(), "restart_failed": 0, "changed": 0, "unreadable": 0}
        try:
            self.daemon.start()
        except RuntimeError as exc:
            found["restart_failed"] = 1
            found["why"] = str(exc).strip().splitlines()[-1][:500]
            return found
        with Client(self.daemon.endpoint, timeout_ms=CLIENT_TIMEOUT_MS) as client:
            for conv, digest in sorted(self.journals.items()):
                try:
                    entries = client.conversation_thread_entries(conv)
                except Exception:  # noqa: BLE001 — counted: each conversation must read back
                    found["unreadable"] += 1
                    continue
                if hashlib.sha256(msgspec.msgpack.encode(entries)).hexdigest() != digest:
                    found["changed"] += 1
                    found.setdefault("first_changed", conv)
        return found


def _refused_locally(exc: BaseException) -> bool:
    """The client's own refusals: a value msgpack cannot carry, a frame over the limit."""
    message = str(exc)
    return isinstance(exc, InvalidLocator) or (isinstance(exc, BadRequest) and (
        message.startswith(("the request cannot be encoded", "request of "))))


MUST_BE_ZERO = ("unanswered requests (DaemonUnavailable)", "internal errors", "other exceptions in the client",
                "generations without exactly one outcome", "runs not resolved once in the journal", "daemon exits",
                "leftover worker processes", "leftover commands", "cleanup failures", "reads outside a workspace",
                "writes outside a workspace", "daemon refused to restart on the run's journal",
                "conversations unreadable after the restart", "conversations changed by the restart", "daemon exit codes at the two stops")


def run(n: int, seed_: int, threads: int = 4, spares: int = 2, quiet: bool = False,
        replay: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Drive `n` generated cases (or the `replay` cases) through a fresh daemon; returns
    the figures, those of MUST_BE_ZERO among them, and the failing cases."""
    with tempfile.TemporaryDirectory(prefix="genvisor-fuzz-runs-") as tmp:
        root = Path(tmp)
        fuzz = Run(root, threads=threads if replay is None else 1, spares=spares)
        fuzz.progress = not quiet
        started = time.perf_counter()
        try:
            fuzz.start()
            ready = time.perf_counter()
            if replay is None:
                fuzz.drive(lambda sink: generate_cases(n, seed_, sink))
            else:
                fuzz.drive(lambda sink: [sink(entry["case"]) for entry in replay])
            elapsed = time.perf_counter() - ready
            final = fuzz.final_checks()
            rss_mib = fuzz.daemon.rss_mib()
            restart = fuzz.restart_check()
        finally:
            code = fuzz.close()
        log = fuzz.daemon.log()
    errors_logged = sum(" ERROR " in line or "Traceback" in line for line in log.splitlines())
    t = fuzz.totals
    done = sum(fuzz.cases.values())
    figures: dict[str, Any] = {
        "cases": done,
        **{f"  {family}": fuzz.cases[family] for family in FAMILIES},
        "requests": t["requests"],
        "generations": t["generations"],
        "unanswered requests (DaemonUnavailable)": t["unanswered"],
        "internal errors": t["internal"],
        "other exceptions in the client": t["exceptions"],
        "generations without exactly one outcome": t["no_single_outcome"],
        "runs not resolved once in the journal": t["journal_mismatch"],
        "daemon exits": len(fuzz.exits),
        "leftover worker processes": final["leftover_workers"],
        "leftover commands": final["leftover_commands"],
        "cleanup failures": final["cleanup_failures"],
        "reads outside a workspace": t["secrets_read"],
        "writes outside a workspace": t["escapes"] + final["written_outside_at_end"],
        "daemon refused to restart on the run's journal": restart["restart_failed"],
        "conversations unreadable after the restart": restart["unreadable"],
        "conversations changed by the restart": restart["changed"],
        "daemon exit codes at the two stops": restart["stop_code"] or code,
        "refused by the client itself (not sent)": t["client_refused"],
        "await timeouts (then canceled)": t["await_timeouts"],
        "errors in the daemon's log": errors_logged,
        "fake server errors": sum(len(f.server_errors) for f in fuzz.fakes),
        "daemon RSS at the end (MiB)": round(rss_mib, 1),
        "wall time (s)": round(time.perf_counter() - started, 1),
        "cases/s": round(done / elapsed, 1) if elapsed else 0.0,
    }
    result = {"figures": figures, "failures": fuzz.failures, "exits": fuzz.exits, "outcomes": fuzz.outcomes, "restart": restart,
              "messages": fuzz.messages,
              "answers": fuzz.answers, "kinds": fuzz.kinds, "tool_calls": fuzz.tool_calls,
              "clean": all(figures[name] == 0 for name in MUST_BE_ZERO) and done == (n if replay is None else len(replay))}
    if not quiet:
        report(result, n, seed_, log)
    return result


def report(result: dict[str, Any], n: int, seed_: int, log: str) -> None:
    figures = result["figures"]
    print(f"fuzz_runs: n={n} seed={seed_}")
    print("| measure | value |\n|---|---|")
    for name, value in figures.items():
        note = "   <-- expected 0" if name in MUST_BE_ZERO and value != 0 else ""
        print(f"| {name}{' (expected 0)' if name in MUST_BE_ZERO else ''} | {value}{note} |")
    print("\noutcomes of the generations, by family:")
    for family in FAMILIES:
        row = sorted(((o, c) for (f, o), c in result["outcomes"].items() if f == family), key=lambda oc: -oc[1])
        print(f"  {family}: " + ", ".join(f"{o} {c}" for o, c in row))
    print("\nthe commonest LLMError messages, by family:")
    for family in FAMILIES:
        row = sorted(((m, c) for (f, m), c in result["messages"].items() if f == family), key=lambda mc: -mc[1])[:6]
        print(f"  {family}:\n" + "\n".join(f"    {c:>5}  {m}" for m, c in row))
    print("\ncase kinds: " + ", ".join(f"{k} {c}" for k, c in sorted(result["kinds"].items())))
    print("tool calls sent (scripted): " + ", ".join(f"{k} {c}" for k, c in sorted(result["tool_calls"].items())))
    print("\nanswers, by request:")
    for key, count in sorted(result["answers"].items()):
        print(f"  {key:<64} {count}")
    if result["restart"].get("why") or result["restart"].get("first_changed"):
        print(f"\nrestart: {result['restart']}")
    for exit_ in result["exits"]:
        print(f"\ndaemon exit: {exit_}")
    for failure in result["failures"][:20]:
        print(f"\nFAILED case {failure['number']}: " + "\n  ".join(failure["problems"]))
        print(f"  case: {failure['case']!r:.4000}")
    if len(result["failures"]) > 20:
        print(f"\n… and {len(result['failures']) - 20} more failing cases")
    if figures["errors in the daemon's log"]:
        errors = [line for line in log.splitlines() if " ERROR " in line or "Traceback" in line]
        print("\nfirst errors in the daemon's log:\n  " + "\n  ".join(e[:300] for e in errors[:10]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="cases to run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=4, help="client threads, each with its conversations and fake server")
    parser.add_argument("--spares", type=int, default=2, help="the daemon's spare workers")
    parser.add_argument("--known", action="store_true", help="replay KNOWN_FAILURES instead, each on a fresh daemon")
    parser.add_argument("--with-known", action="store_true", help="generate the patterns of KNOWN_FAILURES too")
    args = parser.parse_args()
    if args.known:
        return replay_known(args.spares)
    global GENERATE_KNOWN
    GENERATE_KNOWN = args.with_known
    result = run(args.n, args.seed, threads=args.threads, spares=args.spares)
    return 0 if result["clean"] else 1


def replay_known(spares: int) -> int:
    """Each of KNOWN_FAILURES on a daemon of its own: still failing, or fixed (then move
    it to a test and out of the list). Non-zero while any still fails."""
    still = 0
    for entry in KNOWN_FAILURES:
        result = run(1, 0, spares=spares, quiet=True, replay=[entry])
        bad = {name: value for name, value in result["figures"].items() if name in MUST_BE_ZERO and value}
        still += bool(bad)
        print(f"{'STILL FAILING' if bad else 'fixed'}: {entry['name']}" + (f"  {bad}" if bad else ""))
        for failure in result["failures"]:
            print("  " + "\n  ".join(problem.splitlines()[-1][:300] for problem in failure["problems"]))
        if result["restart"].get("why"):
            print(f"  restart: {result['restart']['why']}")
    return 1 if still else 0


if __name__ == "__main__":
    sys.exit(main())
