"""The `genvisor` command line: each verb mirrors a client call.

Exit codes: 0 success, 1 the call raised a genvisor error (printed as `error: code: message`),
2 usage error, 3 no daemon answered.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import msgspec

from genvisor.client.client import Client
from genvisor.errors import DaemonUnavailable, GenvisorError
from genvisor.ipc.curve import CLIENT_KEY_ENV, SERVER_KEY_ENV, CurveError, write_certificate_pair
from genvisor.ipc.endpoint import EndpointError
from genvisor.types import DaemonStatus, GenerationEvent, LatencySummary


def _locator(args: argparse.Namespace) -> Any:
    return (args.project, args.conversation) if args.project else args.conversation


def _json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _print_json(value: Any) -> None:
    print(msgspec.json.encode(value).decode())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="genvisor", description="Drive a genvisor daemon.")
    parser.add_argument("--endpoint", help="daemon endpoint (default: $GENVISOR_ENDPOINT or the default ipc path)")
    parser.add_argument("--timeout-ms", type=int, default=10_000, help="how long to wait for the daemon to answer")
    parser.add_argument("--server-key", metavar="FILE", help=f"the daemon's CURVE public certificate, for tcp (default: ${SERVER_KEY_ENV})")
    parser.add_argument("--client-key", metavar="FILE", help=f"this client's CURVE secret certificate (default: ${CLIENT_KEY_ENV})")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    verbs.add_parser("ping", help="check the daemon answers; print version, pid, uptime")
    verbs.add_parser("serve", help="run the daemon (see `genvisor serve --help`)")
    verbs.add_parser("demo", help="start a daemon on the scripted backend, run a short demo, stop it")
    keygen = verbs.add_parser("keygen", help="write a CURVE certificate pair: DIR/NAME.key (public) and DIR/NAME.key_secret (0600)")
    keygen.add_argument("dir")
    keygen.add_argument("name")

    def conversation_verb(name: str, help_text: str) -> argparse.ArgumentParser:
        verb = verbs.add_parser(name, help=help_text)
        verb.add_argument("conversation")
        verb.add_argument("--project", help="project id (scopes the conversation)")
        verb.add_argument("--json", action="store_true", help="print the result as JSON")
        return verb

    send = conversation_verb("send", "send a message and print the reply as it streams")
    send.add_argument("text")
    generate = conversation_verb("generate", "start a generation; print its ref")
    for verb in (send, generate):
        verb.add_argument("--backend")
        verb.add_argument("--model")
        verb.add_argument("--backend-opts", type=_json_object, default={}, help="JSON object, e.g. '{\"delay_ms\": 50}'")
        verb.add_argument("--options", type=_json_object, default={}, help="more generation options as a JSON object")
    send.add_argument("--await-timeout-ms", type=int, default=30_000)
    wait = conversation_verb("await", "wait for a generation's outcome")
    wait.add_argument("ref")
    wait.add_argument("--await-timeout-ms", type=int, default=30_000)
    wait.add_argument("--no-cancel-on-timeout", action="store_true")
    cancel = conversation_verb("cancel", "cancel the active generation")
    cancel.add_argument("--reason", default="cancel_requested")
    conversation_verb("state", "print the conversation's derived state")

    start = conversation_verb("start", "start a conversation (error if it exists)")
    start.add_argument("--metadata", type=_json_object, default=None)
    for name, help_text in (("message", "record a user message (no generation)"), ("record", "record an assistant message")):
        verb = conversation_verb(name, help_text)
        verb.add_argument("text")
    messages = conversation_verb("messages", "list messages")
    messages.add_argument("--max", type=int, dest="max_messages")
    messages.add_argument("--role", action="append", dest="roles", help="keep only this role (repeatable)")
    context = conversation_verb("context", "the context a generation would send")
    context.add_argument("--max", type=int, dest="max_messages", default=40)
    context.add_argument("--include-system", action="store_true")
    context.add_argument("--include-tool", action="store_true")
    conversation_verb("timeline", "messages and events in order")
    conversation_verb("entries", "the raw journal entries")
    llm = conversation_verb("configure-llm", "set backend/provider/model/options (merged)")
    llm.add_argument("--backend")
    llm.add_argument("--provider")
    llm.add_argument("--model")
    llm.add_argument("--options", type=_json_object, default=None)
    skills = conversation_verb("skills", "replace the enabled skills")
    skills.add_argument("skills", nargs="*")
    mode = conversation_verb("mode", "print the mode, or switch it")
    mode.add_argument("set", nargs="?", metavar="MODE")
    mode.add_argument("--state", type=_json_object, default=None, help="mode_state as a JSON object")
    mode.add_argument("--reason")
    mode.add_argument("--force", action="store_true")
    mode.add_argument("--cancel-reason")
    conversation_verb("stop", "stop the conversation (cancels its generation first)")
    for name, help_text in (
        ("modes", "list the supported modes"),
        ("telemetry", "run counters by mode/backend/outcome"),
        ("status", "how the daemon is doing: runs, queue, workers, journal, latencies"),
    ):
        verbs.add_parser(name, help=help_text).add_argument("--json", action="store_true")
    return parser


def _generation_options(args: argparse.Namespace) -> dict[str, Any]:
    options = dict(args.options)
    for key in ("backend", "model"):
        if getattr(args, key):
            options[key] = getattr(args, key)
    if args.backend_opts:
        options["backend_opts"] = args.backend_opts
    return options


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.verb == "demo":
            return demo()
        if args.verb == "keygen":
            return keygen(args.dir, args.name)
        with Client(args.endpoint, timeout_ms=args.timeout_ms, server_key=args.server_key, client_key=args.client_key) as client:
            return _run(client, args)
    except (CurveError, EndpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except DaemonUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except GenvisorError as exc:
        print(f"error: {exc.code}: {exc}", file=sys.stderr)
        return 1


def _run(client: Client, args: argparse.Namespace) -> int:
    if args.verb == "ping":
        info = client.ping()
        print(f"genvisor {info.version} pid {info.pid} up {info.uptime_s:.1f}s at {info.endpoint}")
        return 0
    if args.verb == "modes":
        modes = client.supported_modes()
        _print_json(modes) if args.json else [print(f"{m.id} ({m.stability}, v{m.version}): {m.summary}") for m in modes]
        return 0
    if args.verb == "telemetry":
        counts = client.telemetry()
        _print_json(counts) if args.json else [print(f"{c.event} mode={c.mode} backend={c.backend} outcome={c.outcome or '-'} category={c.category or '-'} {c.count}") for c in counts]
        return 0
    if args.verb == "status":
        status = client.status()
        _print_json(status) if args.json else print(_format_status(status))
        return 0
    loc = _locator(args)
    simple = _SIMPLE_VERBS.get(args.verb)
    if simple is not None:
        call, show = simple
        value = call(client, loc, args)
        if args.json:
            _print_json(value)
        elif value is not None:
            show(value)
        return 0
    if args.verb == "send":
        streamed: list[str] = []

        def on_event(event: GenerationEvent) -> None:
            if event.kind == "delta" and event.text and not args.json:
                streamed.append(event.text)
                print(event.text, end="", flush=True)
            elif event.kind == "tool_call" and event.tool_call and not args.json:
                print(f"\n[tool] {event.tool_call.name} {event.tool_call.arguments}", file=sys.stderr, flush=True)
            elif event.kind == "tool_result" and event.tool_result and not args.json:
                result = event.tool_result
                first_line = result.content.splitlines()[0] if result.content else ""
                print(f"[tool] {'error: ' if result.is_error else '-> '}{first_line[:120]}", file=sys.stderr, flush=True)

        conversation, result = client.send_and_generate(
            loc, args.text, generation_opts=_generation_options(args), await_opts={"timeout_ms": args.await_timeout_ms}, on_event=on_event
        )
        if args.json:
            _print_json({"conversation": conversation, "result": result})
        elif streamed:
            print()
        else:
            print(result.text)
        return 0
    if args.verb == "generate":
        ref = client.generate_assistant_reply(loc, **_generation_options(args))
        _print_json({"ref": ref}) if args.json else print(ref)
        return 0
    if args.verb == "await":
        result = client.await_generation(loc, args.ref, args.await_timeout_ms, cancel_on_timeout=not args.no_cancel_on_timeout)
        _print_json(result) if args.json else print(result.text)
        return 0
    if args.verb == "cancel":
        client.cancel_generation(loc, args.reason)
        return 0
    if args.verb == "state":
        conversation = client.conversation(loc)
        if args.json:
            _print_json(conversation)
        else:
            state = conversation.state
            print(f"{conversation.id}: {state.status}, turn {state.turn}, {len(state.messages)} messages, mode {state.mode}")
            for message in state.messages:
                print(f"  [{message.seq}] {message.role}: {message.content}")
        return 0
    raise AssertionError(args.verb)


def _show_messages(messages) -> None:
    for m in messages:
        print(f"[{m.seq}] {m.role}: {m.content}" if hasattr(m, "seq") else f"{m.role}: {m.content}")


def _show_timeline(entries) -> None:
    for e in entries:
        what = f"{e.role}: {e.content}" if e.kind == "message" else f"{e.event} {msgspec.json.encode(e.data).decode()}"
        print(f"[{e.seq}] {what}")


def _show_conversation(conversation) -> None:
    state = conversation.state
    print(f"{conversation.id}: {state.status}, turn {state.turn}, {len(state.messages)} messages, mode {state.mode}")


def _mode(client: Client, loc: Any, args: argparse.Namespace):
    if args.set is None:
        return client.mode(loc)
    return client.configure_mode(loc, args.set, args.state, reason=args.reason, force=args.force, cancel_reason=args.cancel_reason)


# verb → (call, human printer); --json prints the call's result as JSON instead.
_SIMPLE_VERBS = {
    "start": (lambda c, loc, a: c.start_conversation(a.conversation, a.project, a.metadata), _show_conversation),
    "message": (lambda c, loc, a: c.send_user_message(loc, a.text), _show_conversation),
    "record": (lambda c, loc, a: c.record_assistant_message(loc, a.text), _show_conversation),
    "messages": (lambda c, loc, a: c.conversation_messages(loc, a.max_messages, a.roles), _show_messages),
    "context": (lambda c, loc, a: c.conversation_llm_context(loc, a.max_messages, a.include_system, a.include_tool), _show_messages),
    "timeline": (lambda c, loc, a: c.conversation_timeline(loc), _show_timeline),
    "entries": (lambda c, loc, a: c.conversation_thread_entries(loc), _show_timeline),
    "configure-llm": (lambda c, loc, a: c.configure_llm(loc, a.backend, provider=a.provider, model=a.model, options=a.options), _show_conversation),
    "skills": (lambda c, loc, a: c.configure_skills(loc, a.skills), lambda conv: print(", ".join(conv.state.skills) or "(none)")),
    "mode": (_mode, lambda v: print(v) if isinstance(v, str) else print(v.state.mode, v.state.mode_state)),
    "stop": (lambda c, loc, a: c.stop_conversation(loc), print),
}


def keygen(directory: str, name: str) -> int:
    public, secret = write_certificate_pair(directory, name)
    print(f"wrote {public}: the public key, to hand out (a client's goes in the daemon's authorized_clients_dir, "
          "the daemon's to its clients as --server-key)")
    print(f"wrote {secret}: the secret key, mode 0600 (the daemon's server_secret_key_file, or a client's --client-key)")
    return 0


def demo() -> int:
    """Start a private daemon on the scripted backend, show a few generations, stop it."""
    with tempfile.TemporaryDirectory(prefix="genvisor-demo-") as tmp:
        endpoint = f"ipc://{tmp}/run/genvisor.sock"
        env = {**os.environ, "GENVISOR_LOG_LEVEL": "WARNING"}
        daemon = subprocess.Popen([sys.executable, "-m", "genvisor", "serve", "--endpoint", endpoint], env=env)
        try:
            _wait_until_serving(daemon, endpoint)
            with Client(endpoint, timeout_ms=30_000) as client:
                info = client.ping()
                print(f"daemon up: genvisor {info.version}, pid {info.pid}, {info.endpoint}\n")
                _, result = client.send_and_generate("demo", "hello, genvisor")
                print(f"user: hello, genvisor\nassistant: {result.text}   (echo of the scripted backend)\n")
                print("assistant (streamed): ", end="", flush=True)
                client.send_and_generate(
                    "demo",
                    "stream something",
                    generation_opts={"backend_opts": {"chunks": ["Each ", "turn ", "runs ", "in ", "its ", "own ", "process."], "chunk_delay_ms": 60}},
                    on_event=lambda e: print(e.text, end="", flush=True) if e.kind == "delta" else None,
                )
                print("\n")
                client.send_user_message("demo", "this one will be canceled")
                ref = client.generate_assistant_reply("demo", backend_opts={"delay_ms": 60_000})
                client.cancel_generation("demo", reason="demo_cancel")
                try:
                    client.await_generation("demo", ref)
                except GenvisorError as exc:
                    print(f"canceled generation -> {type(exc).__name__}: {exc}")
                state = client.conversation("demo").state
                print(f"conversation 'demo': status {state.status}, turn {state.turn}, {len(state.messages)} messages")
        finally:
            daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=60)
        print(f"daemon stopped (exit {code})")
        return code


def _wait_until_serving(daemon: subprocess.Popen, endpoint: str, timeout_s: float = 30) -> None:
    """Wait for a daemon just started to answer (a client fails at once while its socket
    does not exist yet)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if daemon.poll() is not None:
            raise DaemonUnavailable(f"the demo daemon exited ({daemon.returncode}) before it answered")
        try:
            with Client(endpoint, timeout_ms=1_000) as client:
                client.ping()
                return
        except DaemonUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # it is starting: look again shortly


def _format_status(s: DaemonStatus) -> str:
    def latency(summary: LatencySummary) -> str:
        if not summary.count:
            return "-"
        return f"p50 {summary.p50_ms:.2f} ms  p99 {summary.p99_ms:.2f} ms  (n={summary.count})"

    finished = "  ".join(f"{outcome} {n}" for outcome, n in s.runs_finished.items())
    rows = [
        ("daemon", f"genvisor {s.info.version}, pid {s.info.pid}, up {s.info.uptime_s:.0f}s, {s.info.endpoint}"),
        ("metrics", f"http://{s.metrics}/metrics" if s.metrics else "off (serve --metrics HOST:PORT)"),
        ("journal", f"{s.journal}, {s.conversations} conversations, {s.journal_unsynced} writes unsynced"),
        ("runs", f"{s.active_runs}/{s.max_active} active, {s.queued_runs}/{s.max_queued} queued, {s.spare_workers} spare workers"),
        ("totals", f"started {s.runs_started}  {finished}"),
        ("refused", f"overloaded {s.admissions_rejected}  bad frames {s.frames_rejected}"),
        ("health", f"cleanup failures {s.cleanup_failures}  zygote restarts {s.zygote_restarts}"),
        ("run", latency(s.run_latency)),
        ("queue wait", latency(s.queue_wait)),
        ("worker spawn", latency(s.worker_spawn)),
        ("cancel→reaped", latency(s.cancel_reaped)),
    ]
    return "\n".join(f"{label:>14}  {value}" for label, value in rows)
