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
from typing import Any

import msgspec

from genvisor.client.client import Client
from genvisor.errors import DaemonUnavailable, GenvisorError
from genvisor.types import GenerationEvent


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
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    verbs.add_parser("ping", help="check the daemon answers; print version, pid, uptime")
    verbs.add_parser("serve", help="run the daemon (see `genvisor serve --help`)")
    verbs.add_parser("demo", help="start a daemon on the scripted backend, run a short demo, stop it")

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
    if args.verb == "demo":
        return demo()
    try:
        with Client(args.endpoint, timeout_ms=args.timeout_ms) as client:
            return _run(client, args)
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
    loc = _locator(args)
    if args.verb == "send":
        streamed: list[str] = []

        def on_event(event: GenerationEvent) -> None:
            if event.kind == "delta" and event.text and not args.json:
                streamed.append(event.text)
                print(event.text, end="", flush=True)
            elif event.kind == "tool_call" and event.tool_call and not args.json:
                print(f"\n[tool] {event.tool_call.name} {event.tool_call.arguments}", file=sys.stderr)

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


def demo() -> int:
    """Start a private daemon on the scripted backend, show a few generations, stop it."""
    with tempfile.TemporaryDirectory(prefix="genvisor-demo-") as tmp:
        endpoint = f"ipc://{tmp}/run/genvisor.sock"
        env = {**os.environ, "GENVISOR_LOG_LEVEL": "WARNING"}
        daemon = subprocess.Popen([sys.executable, "-m", "genvisor", "serve", "--endpoint", endpoint], env=env)
        try:
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
