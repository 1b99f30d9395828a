"""The `genvisor` command line: each verb mirrors a client call.

Options that pick the daemon (--endpoint, --timeout-ms, --server-key, --client-key)
and --json go before or after the verb. With --json a verb prints one JSON value on
stdout, and an error is one JSON object on stderr: {"error": {"code", "message", …}}.

Exit codes: 0 success, 1 the call raised a genvisor error (printed as `error: code:
message`), 2 usage error, 3 no daemon answered, 130 interrupted (Ctrl-C), 141 stdout
closed early (`genvisor status | head`), as for a tool killed by SIGPIPE.

Ctrl-C while `send` or `await` waits cancels the run (reason `client_interrupt`);
with --detach it leaves the run running and says how to await it. A second Ctrl-C
while the cancel is on its way exits at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any, NoReturn

import msgspec

from genvisor.client.client import Client
from genvisor.errors import AwaitTimeout, DaemonUnavailable, ErrorInfo, GenerationCanceled, GenvisorError
from genvisor.ipc.curve import CLIENT_KEY_ENV, SERVER_KEY_ENV, CurveError, write_certificate_pair
from genvisor.ipc.endpoint import EndpointError
from genvisor.limits import CONTEXT_MESSAGES
from genvisor.types import (
    ROLES,
    ApprovalRequest,
    Conversation,
    DaemonStatus,
    GenerationEvent,
    LatencySummary,
    LLMResult,
    WorkspaceChanges,
)

EXIT_ERROR, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 2, 3, 130, 141

# The skills the daemon's `coding` mode knows, one per tool (genvisor.modes.tools.SPECS,
# which a client does not import; a test keeps the two the same).
SKILLS = ("read_file", "list_dir", "search_text", "write_file", "edit_file", "run_command")

STATUS_MEANINGS = {
    "idle": "no message yet",
    "pending_llm": "the last user message awaits its reply",
    "responding": "the last turn has its reply",
    "canceled": "the last generation was canceled",
}

INTERRUPT_REASON = "client_interrupt"


# ---- arguments ---------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are JSON when --json is on the command line."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if _Parser.json_errors:
            _print_error({"code": "usage", "message": f"{self.prog}: {message}"}, as_json=True)
            sys.exit(EXIT_USAGE)
        super().error(message)


def _wants_json(argv: list[str]) -> bool:
    return "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object: {text}")
    return value


def _skill(name: str) -> str:
    if name not in SKILLS:
        raise argparse.ArgumentTypeError(f"unknown skill {name!r} (known: {', '.join(SKILLS)})")
    return name


def _add_daemon_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The options that pick the daemon, and --json. The top-level parser holds the
    defaults; each verb's copy sets a value only when given (SUPPRESS), so an option
    before the verb is not undone by its absence after it."""

    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    parser.add_argument("--endpoint", default=default(None), help="daemon endpoint (default: $GENVISOR_ENDPOINT or the default ipc path)")
    parser.add_argument("--timeout-ms", type=int, default=default(10_000), metavar="MS",
                        help="how long to wait for the daemon to answer a call (default 10000); an await waits as long as "
                             "its run takes, see --await-timeout-ms")
    parser.add_argument("--server-key", metavar="FILE", default=default(None),
                        help=f"the daemon's CURVE public certificate, for tcp (default: ${SERVER_KEY_ENV})")
    parser.add_argument("--client-key", metavar="FILE", default=default(None),
                        help=f"this client's CURVE secret certificate (default: ${CLIENT_KEY_ENV})")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the result as one JSON value; an error as a JSON object on stderr")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="genvisor", description="Drive a genvisor daemon.",
                     epilog="Options that pick the daemon, and --json, go before or after the verb.")
    _add_daemon_options(parser, top=True)
    common = _Parser(add_help=False)  # a parent: only its arguments are used
    _add_daemon_options(common, top=False)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help_text: str) -> argparse.ArgumentParser:
        return verbs.add_parser(name, help=help_text, description=help_text, parents=[common])

    verb("ping", "check the daemon answers; print version, pid, uptime")
    verbs.add_parser("serve", help="run the daemon (see `genvisor serve --help`)", add_help=False)  # its options: serve's
    verbs.add_parser("demo", help="start a daemon on the scripted backend, run a short demo, stop it")
    keygen = verb("keygen", "write a CURVE certificate pair: DIR/NAME.key (public) and DIR/NAME.key_secret (0600)")
    keygen.add_argument("dir")
    keygen.add_argument("name")

    def conversation_verb(name: str, help_text: str) -> argparse.ArgumentParser:
        parsed = verb(name, help_text)
        parsed.add_argument("conversation")
        parsed.add_argument("--project", help="project id (scopes the conversation)")
        return parsed

    send = conversation_verb("send", "send a message and print the reply as it streams")
    send.add_argument("text")
    generate = conversation_verb("generate", "start a generation; print its ref")
    for parsed in (send, generate):
        parsed.add_argument("--backend")
        parsed.add_argument("--model")
        parsed.add_argument("--backend-opts", type=_json_object, default={}, help="JSON object, e.g. '{\"delay_ms\": 50}'")
        parsed.add_argument("--options", type=_json_object, default={},
                            help="more generation options as a JSON object (e.g. '{\"timeout_ms\": 120000}')")
        parsed.add_argument("--multitask", choices=("reject", "enqueue", "interrupt"),
                            help="if a generation is active on the conversation: refuse (default), run after it, or cancel it")
    wait = conversation_verb("await", "wait for a generation's outcome")
    wait.add_argument("ref")
    follow = conversation_verb("follow", "re-attach to a generation (say, after Ctrl-C of `send --detach`): print its "
                                         "events as they come, from the first (or after --after SEQ), to its end")
    follow.add_argument("ref")
    follow.add_argument("--after", type=int, default=0, metavar="SEQ", help="only the events after this seq")
    follow.add_argument("--await-timeout-ms", type=int, default=None, metavar="MS",
                        help="stop following after MS ms (exit 1, await_timeout; the run goes on). Default: to its end")
    for parsed in (send, wait):
        parsed.add_argument("--await-timeout-ms", type=int, default=None, metavar="MS",
                            help="stop waiting after MS ms: the run is then canceled (reason await_timeout) unless "
                                 "--no-cancel-on-timeout, and the exit is 1 (await_timeout). Default: wait as long as the "
                                 "run takes (its own timeout_ms bounds it)")
        parsed.add_argument("--no-cancel-on-timeout", action="store_true", help="at --await-timeout-ms, leave the run running")
        parsed.add_argument("--detach", action="store_true",
                            help="on Ctrl-C leave the run running and print how to await it (default: cancel it)")
    cancel = conversation_verb("cancel", "cancel the active generation")
    cancel.add_argument("--reason", default="cancel_requested")
    conversation_verb("state", "print the conversation's state: status, active run, messages")

    start = conversation_verb("start", "start a conversation (error if it exists)")
    start.add_argument("--metadata", type=_json_object, default=None)
    for name, help_text in (("message", "record a user message (no generation)"), ("record", "record an assistant message")):
        conversation_verb(name, help_text).add_argument("text")
    messages = conversation_verb("messages", "list messages")
    messages.add_argument("--max", type=int, dest="max_messages")
    messages.add_argument("--role", action="append", dest="roles", choices=ROLES, help="keep only this role (repeatable)")
    context = conversation_verb("context", "the context a generation would send")
    context.add_argument("--max", type=int, dest="max_messages", default=CONTEXT_MESSAGES)
    context.add_argument("--include-system", action="store_true")
    context.add_argument("--include-tool", action="store_true")
    conversation_verb("timeline", "messages and events in order")
    conversation_verb("entries", "the raw journal entries")
    llm = conversation_verb("configure-llm", "set backend/provider/model/options (merged)")
    llm.add_argument("--backend")
    llm.add_argument("--provider")
    llm.add_argument("--model")
    llm.add_argument("--options", type=_json_object, default=None)
    skills = conversation_verb("skills", "show the enabled skills, or replace them")
    skills.add_argument("skills", nargs="*", type=_skill, metavar="SKILL",
                        help=f"enable exactly these (one per tool): {', '.join(SKILLS)}")
    skills.add_argument("--none", action="store_true", help="turn every skill off")
    mode = conversation_verb("mode", "print the mode, or switch it")
    mode.add_argument("set", nargs="?", metavar="MODE")
    mode.add_argument("--state", type=_json_object, default=None, help="mode_state as a JSON object")
    mode.add_argument("--reason")
    mode.add_argument("--force", action="store_true")
    mode.add_argument("--cancel-reason")
    conversation_verb("stop", "stop the conversation (cancels its generation first)")
    plan = conversation_verb("plan", "the latest plan a planning turn made (switch with `mode CONV planning`)")
    plan.add_argument("--history", action="store_true", help="every plan, oldest first")
    changes = conversation_verb("changes", "what a generation did to the workspace: its files, then the diff")
    changes.add_argument("ref", help="a generation's ref (or a revert's)")
    changes.add_argument("--stat", action="store_true", help="the files only, no diff")
    revert = conversation_verb("revert", "undo what a completed generation did to the workspace "
                                         "(refused, changing nothing, if a path it changed has changed since)")
    revert.add_argument("ref", help="a generation's ref (or a revert's: a revert can be undone too)")
    revert.add_argument("--reason", help="why (journaled with the revert)")
    conversation_verb("approvals", "the tool calls the conversation's paused run waits for answers to")
    for name, help_text in (("approve", "let a paused run make this tool call"),
                            ("deny", "refuse a paused run this tool call (the model is told)")):
        answer = conversation_verb(name, help_text)
        answer.add_argument("ref")
        answer.add_argument("call_id")
        answer.add_argument("--note", help="why (the model sees it with a denial; journaled either way)")
    verb("modes", "list the supported modes")
    verb("telemetry", "run counters by mode/backend/outcome")
    verb("status", "how the daemon is doing: runs, queue, workers, journal, latencies")
    return parser


def _generation_options(args: argparse.Namespace) -> dict[str, Any]:
    options = dict(args.options)
    for key in ("backend", "model", "multitask"):
        if getattr(args, key):
            options[key] = getattr(args, key)
    if args.backend_opts:
        options["backend_opts"] = args.backend_opts
    return options


# ---- output ------------------------------------------------------------------------------


def _print_json(value: Any) -> None:
    print(msgspec.json.encode(value).decode())


def _print_error(info: dict[str, Any] | ErrorInfo, *, as_json: bool) -> None:
    if as_json:
        print(msgspec.json.encode({"error": info}).decode(), file=sys.stderr)
    elif isinstance(info, ErrorInfo):
        print(f"error: {info.code}: {info.message}", file=sys.stderr)
    else:
        print(f"error: {info['message']}", file=sys.stderr)


def _fail(args: argparse.Namespace, code: int, info: dict[str, Any] | ErrorInfo) -> int:
    _print_error(info, as_json=args.json)
    return code


# ---- main --------------------------------------------------------------------------------


def main(argv: list[str]) -> int:
    _Parser.json_errors = _wants_json(argv)
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a closed pipe can still be caught
        return code
    except BrokenPipeError:
        # The reader went away (`genvisor status | head`): stop quietly, as a tool killed
        # by SIGPIPE does; point stdout at /dev/null so the exit flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        if _Parser.json_errors:
            _print_error({"code": "interrupted", "message": "interrupted"}, as_json=True)
        else:
            print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str]) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.verb == "serve":  # `genvisor --endpoint URL serve …`: the daemon's own parser takes the rest
        from genvisor.__main__ import serve

        return serve((["--endpoint", args.endpoint] if args.endpoint else []) + rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.verb == "skills" and args.none and args.skills:
        parser.error("skills: give SKILL names or --none, not both")
    if args.verb == "demo" and args.json:
        parser.error("demo has no JSON output")
    try:
        if args.verb == "demo":
            return demo()
        if args.verb == "keygen":
            return keygen(args.dir, args.name, as_json=args.json)
        with Client(args.endpoint, timeout_ms=args.timeout_ms, server_key=args.server_key, client_key=args.client_key) as client:
            return _run(client, args)
    except (CurveError, EndpointError) as exc:
        return _fail(args, EXIT_USAGE, {"code": "usage", "message": str(exc)})
    except DaemonUnavailable as exc:
        if not args.json:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_NO_DAEMON
        return _fail(args, EXIT_NO_DAEMON, exc.info())
    except GenvisorError as exc:
        return _fail(args, EXIT_ERROR, exc.info())


def _locator(args: argparse.Namespace) -> Any:
    return (args.project, args.conversation) if args.project else args.conversation


def _run(client: Client, args: argparse.Namespace) -> int:
    if args.verb == "ping":
        info = client.ping()
        _print_json(info) if args.json else print(f"genvisor {info.version} pid {info.pid} up {info.uptime_s:.1f}s at {info.endpoint}")
        return 0
    if args.verb == "modes":
        modes = client.supported_modes()
        _print_json(modes) if args.json else [print(f"{m.id} ({m.stability}, v{m.version}): {m.summary}") for m in modes]
        return 0
    if args.verb == "telemetry":
        counts = client.telemetry()
        if args.json:
            _print_json(counts)
        else:
            for c in counts:
                print(f"{c.event} mode={c.mode} backend={c.backend} outcome={c.outcome or '-'} category={c.category or '-'} {c.count}")
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
        return _send(client, loc, args)
    if args.verb == "generate":
        ref = client.generate_assistant_reply(loc, **_generation_options(args))
        _print_json({"ref": ref}) if args.json else print(ref)
        return 0
    if args.verb == "await":
        try:
            if sys.stderr.isatty() and not args.json:
                then = "leaves it running" if args.detach else "cancels it; --detach leaves it running"
                print(f"waiting for {args.ref} (Ctrl-C {then})", file=sys.stderr, flush=True)
            result = _await(client, loc, args.ref, args)
        except KeyboardInterrupt:
            return _interrupted(client, loc, args.ref, args)
        _print_json(result) if args.json else print(result.text)
        return 0
    if args.verb == "follow":
        return _follow(client, loc, args)
    if args.verb == "skills":
        return _skills(client, loc, args)
    if args.verb == "plan":
        plans = client.plans(loc)
        shown = plans if args.history else plans[-1:]
        if args.json:
            _print_json(shown if args.history else (shown[0] if shown else None))
            return 0
        if not shown:
            print(f"no plan yet: `{_command(args, 'mode', 'planning')}`, then send the goal")
        for record in shown:
            print(f"# {record.ref} ({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record.at))})")
            print(record.plan.as_text())
        return 0
    if args.verb == "changes":
        changes = client.turn_changes(loc, args.ref)
        _print_json(changes) if args.json else _show_changes(changes, diff=not args.stat)
        return 0
    raise AssertionError(args.verb)


# ---- send and await: Ctrl-C ----------------------------------------------------------------


@contextlib.contextmanager
def _held_interrupt() -> Iterator[list[int]]:
    """Hold a Ctrl-C until the block is done (the list it yields is not empty if one came):
    a run must not start unknown to us. A second Ctrl-C interrupts at once."""
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        if held:
            raise KeyboardInterrupt
        held.append(signum)

    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield held  # SIGINT ignored (a background job) or handled by an embedding program: leave it so
        return
    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield held
    finally:
        signal.signal(signal.SIGINT, previous)


def _send(client: Client, loc: Any, args: argparse.Namespace) -> int:
    """send_user_message → generate (with events) → await, so the ref is known while waiting."""
    options = _generation_options(args)
    streamed: list[str] = []
    if not args.json:
        options.setdefault("events", True)

    def on_event(event: GenerationEvent) -> None:
        if not args.json:
            _show_event(event, streamed)

    ref: str | None = None
    if options.get("multitask", "reject") != "reject":
        return _send_busy(client, loc, args, options, streamed)
    try:
        with _held_interrupt() as held:
            client.send_user_message(loc, args.text)
            if held:
                return _report_interrupt(args, None, "interrupted: the message was recorded; no generation was started")
            try:
                ref = client.generate_assistant_reply(loc, **options)
            except GenvisorError:
                if not args.json:
                    print(f"note: the message was recorded but no generation started; `{_command(args, 'generate')}` "
                          "starts one", file=sys.stderr)
                raise
        if held:
            raise KeyboardInterrupt
        result = _await(client, loc, ref, args, on_event=on_event)
    except KeyboardInterrupt:
        if ref is None:  # a second Ctrl-C while the generation was being started
            return _report_interrupt(args, None, f"interrupted: a generation may have started; `{_command(args, 'state')}` "
                                                 f"shows it, `{_command(args, 'cancel')}` cancels it")
        if streamed:
            print(flush=True)  # end the streamed line before saying what happened
        return _interrupted(client, loc, ref, args)
    return _print_reply(client, loc, ref, result, args, streamed)


def _send_busy(client: Client, loc: Any, args: argparse.Namespace, options: dict[str, Any], streamed: list[str]) -> int:
    """`send --multitask enqueue|interrupt`: one send_and_generate, since the message of a
    queued turn is recorded when its turn comes; the ref is known from its first event."""
    options["events"] = True
    refs: list[str] = []

    def on_event(event: GenerationEvent) -> None:
        refs[:] = [event.ref]
        if not args.json:
            _show_event(event, streamed)

    try:
        _, result = client.send_and_generate(loc, args.text, generation_opts=options, on_event=on_event, await_opts={
            "timeout_ms": args.await_timeout_ms, "cancel_on_timeout": not args.no_cancel_on_timeout})
    except KeyboardInterrupt:
        if not refs:
            return _report_interrupt(args, None, f"interrupted before the turn began: it may still be queued; "
                                                 f"`{_command(args, 'state')}` shows the conversation")
        if streamed:
            print(flush=True)
        return _interrupted(client, loc, refs[0], args)
    return _print_reply(client, loc, refs[0] if refs else None, result, args, streamed)


def _print_reply(client: Client, loc: Any, ref: str | None, result: LLMResult, args: argparse.Namespace, streamed: list[str]) -> int:
    if args.json:
        _print_json({"ref": ref, "conversation": client.conversation(loc), "result": result})
    elif streamed:
        print()
    else:
        print(result.text)
    if not args.json and ref is not None and result.changes.files_total:
        print(f"[workspace] {result.changes.files_total} file(s) changed: `{_command(args, 'changes', ref)}` shows them, "
              f"`{_command(args, 'revert', ref)}` undoes them", file=sys.stderr)
    return 0


def _show_event(event: GenerationEvent, streamed: list[str]) -> None:
    """Print a run's event as `send` and `follow` do: text to stdout as it streams, the
    rest to stderr. `streamed` collects the text printed."""
    if event.kind == "delta" and event.text:
        streamed.append(event.text)
        print(event.text, end="", flush=True)
    elif event.kind == "tool_call" and event.tool_call:
        print(f"\n[tool] {event.tool_call.name} {event.tool_call.arguments}", file=sys.stderr, flush=True)
    elif event.kind == "tool_result" and event.tool_result:
        result = event.tool_result
        first_line = result.content.splitlines()[0] if result.content else ""
        print(f"[tool] {'error: ' if result.is_error else '-> '}{first_line[:120]}", file=sys.stderr, flush=True)
    elif event.kind == "approval_requested" and event.tool_call:
        call = event.tool_call
        print(f"\n[approval] {call.name} {call.arguments} waits for an answer: genvisor approve|deny CONV {event.ref} {call.id}",
              file=sys.stderr, flush=True)
    elif event.kind == "gap":
        print(f"\n[events {event.first_seq}–{event.last_seq} were shed: this client read too slowly]", file=sys.stderr, flush=True)


def _follow(client: Client, loc: Any, args: argparse.Namespace) -> int:
    """Print generation `ref`'s events (after --after) as they come, until its terminal
    event; its failure or cancel is the exit's, as for `await`. Ctrl-C stops following
    only: the run goes on."""
    streamed: list[str] = []
    last = None
    try:
        for event in client.stream_events(loc, args.ref, after_seq=args.after, timeout_ms=args.await_timeout_ms):
            last = event
            _print_json(event) if args.json else _show_event(event, streamed)
    except KeyboardInterrupt:
        seen = f" after event {last.seq}" if last is not None else ""
        return _report_interrupt(args, args.ref, f"\nstopped following {args.ref}{seen}; it keeps running: "
                                                 f"`{_command(args, 'follow', args.ref, '--after', str(last.seq if last else 0))}` "
                                                 "picks up from there", canceled=False, detached=True)
    if streamed:
        print(flush=True)
    if last is not None and last.kind == "failed" and last.error is not None:
        raise last.error.to_exception()
    if last is not None and last.kind == "canceled":
        raise GenerationCanceled(last.reason or "canceled", args.ref)
    return 0


def _await(client: Client, loc: Any, ref: str, args: argparse.Namespace, on_event: Any = None) -> LLMResult:
    return client.await_generation(loc, ref, args.await_timeout_ms, cancel_on_timeout=not args.no_cancel_on_timeout,
                                   on_event=on_event)


def _interrupted(client: Client, loc: Any, ref: str, args: argparse.Namespace) -> int:
    """Ctrl-C while waiting for `ref`: cancel it (an await of no time that cancels on
    timeout: the daemon cancels only that ref, never a newer run), or with --detach
    leave it running."""
    follow = _command(args, "await", ref)
    if args.detach:
        return _report_interrupt(args, ref, f"interrupted: {ref} keeps running (--detach); `{_command(args, 'follow', ref)}` "
                                            f"re-attaches to it, `{follow}` waits for its outcome", canceled=False, detached=True)
    canceled = False
    try:
        if not args.json:
            print(f"interrupted: canceling {ref} (Ctrl-C again to leave it)... ", end="", file=sys.stderr, flush=True)
        client.await_generation(loc, ref, timeout_ms=0, cancel_on_timeout=True, cancel_reason=INTERRUPT_REASON)
    except KeyboardInterrupt:
        outcome = f"interrupted again: it may still be running; `{_command(args, 'cancel')}` cancels it"
    except AwaitTimeout:
        canceled, outcome = True, f"canceled (reason {INTERRUPT_REASON})"
    except DaemonUnavailable as exc:
        outcome = f"not canceled: {exc}"
    except GenvisorError as exc:
        outcome = f"it had already ended ({exc.code}: {exc})"
    else:
        outcome = f"it had already completed; `{follow}` shows its reply"
    if args.json:
        return _report_interrupt(args, ref, f"interrupted: {ref}: {outcome}", canceled=canceled, detached=False)
    print(outcome, file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def _report_interrupt(args: argparse.Namespace, ref: str | None, message: str, **fields: bool) -> int:
    if args.json:
        info = {"code": "interrupted", "message": message, **({"ref": ref} if ref else {}), **fields}
        _print_error(info, as_json=True)
    else:
        print(message, file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


def _command(args: argparse.Namespace, verb: str, *rest: str) -> str:
    """The command line of `verb` on this conversation (to copy and paste)."""
    words = ["genvisor", verb, args.conversation, *rest]
    if args.project:
        words += ["--project", args.project]
    if args.endpoint:
        words += ["--endpoint", args.endpoint]
    return shlex.join(words)


# ---- the other verbs ---------------------------------------------------------------------


def _skills(client: Client, loc: Any, args: argparse.Namespace) -> int:
    if not args.skills and not args.none:
        skills = client.conversation(loc).state.skills
        _print_json({"skills": skills}) if args.json else print(", ".join(skills) or "(none)")
        return 0
    conversation = client.configure_skills(loc, [] if args.none else args.skills)
    _print_json(conversation) if args.json else print(", ".join(conversation.state.skills) or "(none)")
    return 0


def _show_messages(messages) -> None:
    for m in messages:
        print(f"[{m.seq}] {m.role}: {m.content}" if hasattr(m, "seq") else f"{m.role}: {m.content}")


def _show_timeline(entries) -> None:
    for e in entries:
        what = f"{e.role}: {e.content}" if e.kind == "message" else f"{e.event} {msgspec.json.encode(e.data).decode()}"
        print(f"[{e.seq}] {what}")


def _show_conversation(conversation: Conversation) -> None:
    state = conversation.state
    print(f"{conversation.id}: {state.status}, turn {state.turn}, {len(state.messages)} messages, mode {state.mode}")


def _show_state(conversation: Conversation) -> None:
    state = conversation.state
    meaning = STATUS_MEANINGS.get(state.status, "")
    if state.status == "canceled" and state.cancel_reason:
        meaning += f": {state.cancel_reason}"
    print(f"{conversation.id}: {state.status} ({meaning}), turn {state.turn}, {len(state.messages)} messages, mode {state.mode}")
    run = state.active_run
    if run is not None:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started_at))
        print(f"  active run {run.run_id}: {run.status}, step {run.step or '-'}, started {started} "
              f"({max(0.0, time.time() - run.started_at):.0f}s ago)")
    for message in state.messages:
        print(f"  [{message.seq}] {message.role}: {message.content}")


def _mode(client: Client, loc: Any, args: argparse.Namespace):
    if args.set is None:
        return client.mode(loc)
    return client.configure_mode(loc, args.set, args.state, reason=args.reason, force=args.force, cancel_reason=args.cancel_reason)


def _cancel(client: Client, loc: Any, args: argparse.Namespace) -> dict[str, bool]:
    client.cancel_generation(loc, args.reason)
    return {"canceled": True}


def _stop(client: Client, loc: Any, args: argparse.Namespace) -> dict[str, bool]:
    client.stop_conversation(loc)
    return {"stopped": True}


_CHANGE_MARKS = {"added": "A", "modified": "M", "deleted": "D"}


def _show_changes(changes: WorkspaceChanges, *, diff: bool = True) -> None:
    if changes.reverts is not None:
        print(f"{changes.ref}: a revert of {changes.reverts}")
    if changes.workspace not in ("changed", "unchanged"):  # a run that did not complete
        print(f"workspace {changes.workspace}" + (f": {', '.join(changes.paths)}" if changes.paths else ""))
        return
    if not changes.files:
        print("no file changed")
        return
    for file in changes.files:
        sizes = f"{file.size_before if file.size_before is not None else '-'} → {file.size_after if file.size_after is not None else '-'} bytes"
        mode_changed = file.mode_before and file.mode_after and file.mode_before != file.mode_after
        modes = f", mode {file.mode_before} → {file.mode_after}" if mode_changed else ""
        print(f"{_CHANGE_MARKS[file.change]} {file.path} ({sizes}{modes}{', binary' if file.binary else ''})")
    if changes.files_total > len(changes.files):
        print(f"… and {changes.files_total - len(changes.files)} more files")
    if diff and changes.diff:
        print()
        print(changes.diff, end="" if changes.diff.endswith("\n") else "\n")
        if changes.diff_truncated:
            print("(diff cut short: too large to show whole)")


# verb → (call, human printer); --json prints the call's result as JSON instead.
_SIMPLE_VERBS = {
    "start": (lambda c, loc, a: c.start_conversation(a.conversation, a.project, a.metadata), _show_conversation),
    "message": (lambda c, loc, a: c.send_user_message(loc, a.text), _show_conversation),
    "record": (lambda c, loc, a: c.record_assistant_message(loc, a.text), _show_conversation),
    "state": (lambda c, loc, a: c.conversation(loc), _show_state),
    "messages": (lambda c, loc, a: c.conversation_messages(loc, a.max_messages, a.roles), _show_messages),
    "context": (lambda c, loc, a: c.conversation_llm_context(loc, a.max_messages, a.include_system, a.include_tool), _show_messages),
    "timeline": (lambda c, loc, a: c.conversation_timeline(loc), _show_timeline),
    "entries": (lambda c, loc, a: c.conversation_thread_entries(loc), _show_timeline),
    "configure-llm": (lambda c, loc, a: c.configure_llm(loc, a.backend, provider=a.provider, model=a.model, options=a.options), _show_conversation),
    "mode": (_mode, lambda v: print(v) if isinstance(v, str) else print(v.state.mode, v.state.mode_state)),
    "cancel": (_cancel, lambda v: None),
    "stop": (_stop, lambda v: None),
    "revert": (lambda c, loc, a: c.revert_turn(loc, a.ref, a.reason), lambda v: _show_changes(v, diff=False)),
    "approvals": (lambda c, loc, a: c.pending_approvals(loc), lambda v: _show_approvals(v)),
    "approve": (lambda c, loc, a: c.resolve_approval(loc, a.ref, a.call_id, True, a.note), lambda v: None),
    "deny": (lambda c, loc, a: c.resolve_approval(loc, a.ref, a.call_id, False, a.note), lambda v: None),
}


def _show_approvals(requests: list[ApprovalRequest]) -> None:
    if not requests:
        print("no approval is pending")
    for request in requests:
        print(f"{request.ref} {request.call_id}: {request.tool} {request.arguments}")


def keygen(directory: str, name: str, *, as_json: bool = False) -> int:
    public, secret = write_certificate_pair(directory, name)
    if as_json:
        _print_json({"public": str(public), "secret": str(secret)})
        return 0
    print(f"wrote {public}: the public key, to hand out (a client's goes in the daemon's authorized_clients_dir, "
          "the daemon's to its clients as --server-key)")
    print(f"wrote {secret}: the secret key, mode 0600 (the daemon's server_secret_key_file, or a client's --client-key)")
    return 0


def demo() -> int:
    """Start a private daemon on the scripted backend, show a few generations, stop it."""
    # Everything of the demo's daemon — socket, journal, workspaces — lives in a temp dir:
    # it leaves nothing in the user's state dir, and runs beside a daemon already serving.
    with tempfile.TemporaryDirectory(prefix="genvisor-demo-") as tmp:
        endpoint = f"ipc://{tmp}/run/genvisor.sock"
        env = {**os.environ, "GENVISOR_LOG_LEVEL": "WARNING"}
        daemon_log = open(os.path.join(tmp, "daemon.log"), "w+b")  # noqa: SIM115 — closed with the daemon
        daemon = subprocess.Popen(
            [sys.executable, "-m", "genvisor", "serve", "--endpoint", endpoint, "--state-dir", os.path.join(tmp, "state")],
            env=env, stdout=daemon_log, stderr=daemon_log,
        )
        try:
            _wait_until_serving(daemon, endpoint, daemon_log)
            with Client(endpoint, timeout_ms=30_000) as client:
                info = client.ping()
                print(f"daemon up: genvisor {info.version}, pid {info.pid}, {info.endpoint}\n")
                _, result = client.send_and_generate("demo", "hello, genvisor")
                print(f"user: hello, genvisor\nassistant: {result.text}   (echo of the scripted backend)\n")
                print("assistant (streamed): ", end="", flush=True)
                client.send_and_generate(
                    "demo",
                    "stream something",
                    generation_opts={
                        "backend_opts": {"chunks": ["Each ", "turn ", "runs ", "in ", "its ", "own ", "process."], "chunk_delay_ms": 60}
                    },
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
            if daemon.poll() is None:
                daemon.send_signal(signal.SIGTERM)
            code = daemon.wait(timeout=60)
            daemon_log.close()
        print(f"daemon stopped (exit {code})")
        return code


def _wait_until_serving(daemon: subprocess.Popen, endpoint: str, daemon_log: Any, timeout_s: float = 30) -> None:
    """Wait for a daemon just started to answer (a client fails at once while its socket
    does not exist yet); if it exits instead, say so at once, with what it said."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with Client(endpoint, timeout_ms=1_000) as client:
                client.ping()
                return
        except DaemonUnavailable:
            if time.monotonic() > deadline:
                raise
        try:
            daemon.wait(timeout=0.05)  # starting: look again shortly, unless it exits meanwhile
        except subprocess.TimeoutExpired:
            continue
        daemon_log.seek(0)
        said = daemon_log.read().decode(errors="replace").strip().splitlines()
        raise DaemonUnavailable(f"the demo's daemon exited ({daemon.returncode}) before it answered"
                                + (f": {said[-1]}" if said else ""))


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
    if s.executor != "local":
        rows.append(("cluster", f"{s.executor}, {s.cluster}, {len(s.nodes)} nodes, {s.nodes_lost} lost"))
        rows += [(f"node {n.node[:8]}", f"{n.host}  {n.active_runs} active  {n.runs_started} started  {n.spare_workers} spare")
                 for n in s.nodes]
    return "\n".join(f"{label:>14}  {value}" for label, value in rows)
