"""The coding tools: files and commands, confined to the conversation's workspace.

Every path a model names is resolved (symlinks included) and must stay inside the
workspace; anything else is refused with a `ToolError`, which becomes a tool result
the model sees — a tool's failure is not the run's. `run_command` runs an argv (no
shell) in the workspace, in a process group of its own that is killed when the command
ends; its timeout bounds the whole call, reading the output included (see
`Workspace.run_command`). It stays in the worker's session, so whatever ends a run, the
daemon's sweep of that session ends the run's commands too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable

import msgspec
import trio

from genvisor.types import ToolCall, ToolResult

READ_LIMIT = 256 * 1024  # bytes of a file returned to the model
OUTPUT_LIMIT = 64 * 1024  # bytes of a command's stdout and of its stderr
LIST_LIMIT = 1_000
SEARCH_LIMIT = 200
SEARCH_FILE_LIMIT = 2 * 1024 * 1024  # larger files are not searched
COMMAND_TIMEOUT_MS = 60_000
COMMAND_TIMEOUT_MAX_MS = 600_000
# After a command ends, how long we still read output a process it started keeps open.
READ_GRACE_S = 0.5

# The default skills profile: what a conversation may do until configure_skills says
# otherwise. Running commands is opt-in: it reaches beyond the workspace's files.
DEFAULT_SKILLS = ["read_file", "list_dir", "search_text", "write_file", "edit_file"]


class ToolError(Exception):
    """A tool call that cannot be done; its message goes back to the model."""


class ToolSpec(msgspec.Struct, frozen=True):
    name: str
    description: str
    parameters: dict[str, Any]


def _schema(required: list[str], **properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


_STR = {"type": "string"}
_INT = {"type": "integer"}
SPECS: dict[str, ToolSpec] = {
    spec.name: spec
    for spec in (
        ToolSpec("read_file", "Read a text file of the workspace.", _schema(["path"], path=_STR)),
        ToolSpec("list_dir", "List a directory of the workspace (directories end with /).", _schema([], path=_STR)),
        ToolSpec(
            "search_text",
            "Find lines containing a literal text in the workspace's files; answers path:line: text.",
            _schema(["text"], text=_STR, path=_STR),
        ),
        ToolSpec("write_file", "Create or overwrite a file of the workspace.", _schema(["path", "content"], path=_STR, content=_STR)),
        ToolSpec(
            "edit_file",
            "Replace the one exact occurrence of `old` with `new` in a file (fails if `old` is missing or not unique).",
            _schema(["path", "old", "new"], path=_STR, old=_STR, new=_STR),
        ),
        ToolSpec(
            "run_command",
            "Run a program (argv list, no shell) in the workspace; answers its exit code and output.",
            _schema(["argv"], argv={"type": "array", "items": _STR, "minItems": 1}, timeout_ms=_INT),
        ),
    )
}


def manifest(skills: list[str]) -> list[ToolSpec]:
    """The tools the conversation's skills enable, in a stable order."""
    return [spec for name, spec in SPECS.items() if name in skills]


class Workspace:
    def __init__(self, root: str | Path, *, isolated: bool = True) -> None:
        self.root = Path(root).resolve()
        self.isolated = isolated  # in a worker (the tools behave the same either way)

    def resolve(self, path: Any) -> Path:
        if not isinstance(path, str) or not path.strip():
            raise ToolError("path must be a non-empty string")
        if os.path.isabs(path):
            raise ToolError(f"{path!r} is absolute; paths are relative to the workspace")
        resolved = (self.root / path).resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise ToolError(f"{path!r} resolves outside the workspace")
        return resolved

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root)) or "."

    # ---- the tools ---------------------------------------------------------------------

    def read_file(self, path: str) -> str:
        target = self.resolve(path)
        if not target.is_file():
            raise ToolError(f"{path!r} is not a file")
        data = target.read_bytes()
        text = data[:READ_LIMIT].decode("utf-8", errors="replace")
        return text if len(data) <= READ_LIMIT else f"{text}\n[truncated: {len(data)} bytes, first {READ_LIMIT} shown]"

    def list_dir(self, path: str = ".") -> str:
        target = self.resolve(path)
        if not target.is_dir():
            raise ToolError(f"{path!r} is not a directory")
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in target.iterdir())
        shown = names[:LIST_LIMIT]
        return "\n".join(shown) + (f"\n[{len(names) - LIST_LIMIT} more]" if len(names) > LIST_LIMIT else "")

    def search_text(self, text: str, path: str = ".") -> str:
        if not isinstance(text, str) or not text:
            raise ToolError("text must be a non-empty string")
        start = self.resolve(path)
        hits: list[str] = []
        files = [start] if start.is_file() else sorted(p for p in start.rglob("*") if p.is_file())
        for file in files:
            if self.root not in file.resolve().parents or file.stat().st_size > SEARCH_FILE_LIMIT:
                continue  # a symlink out of the workspace, or too big to search
            try:
                lines = file.read_text("utf-8").splitlines()
            except (UnicodeDecodeError, OSError):
                continue
            hits += [f"{self.relative(file)}:{n}: {line}" for n, line in enumerate(lines, 1) if text in line]
            if len(hits) >= SEARCH_LIMIT:
                return "\n".join(hits[:SEARCH_LIMIT]) + "\n[more matches not shown]"
        return "\n".join(hits) or "no matches"

    def write_file(self, path: str, content: str) -> str:
        if not isinstance(content, str):
            raise ToolError("content must be a string")
        target = self.resolve(path)
        if target.is_dir():
            raise ToolError(f"{path!r} is a directory")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, "utf-8")
        return f"wrote {len(content.encode())} bytes to {self.relative(target)}"

    def edit_file(self, path: str, old: str, new: str) -> str:
        if not isinstance(old, str) or not old or not isinstance(new, str):
            raise ToolError("old must be a non-empty string and new a string")
        target = self.resolve(path)
        if not target.is_file():
            raise ToolError(f"{path!r} is not a file")
        text = target.read_text("utf-8")
        count = text.count(old)
        if count == 0:
            raise ToolError(f"the text to replace was not found in {path!r}")
        if count > 1:
            raise ToolError(f"the text to replace occurs {count} times in {path!r}; include more context to make it unique")
        target.write_text(text.replace(old, new, 1), "utf-8")
        return f"edited {self.relative(target)}"

    async def run_command(self, argv: list[str], timeout_ms: int = COMMAND_TIMEOUT_MS) -> str:
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ToolError("argv must be a non-empty list of strings")
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, int) or not 0 < timeout_ms <= COMMAND_TIMEOUT_MAX_MS:
            raise ToolError(f"timeout_ms must be within 1..{COMMAND_TIMEOUT_MAX_MS}")
        try:
            process = await trio.lowlevel.open_process(
                argv,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                # Its own process group, so that what it leaves running dies with it; not
                # its own session, so that in a worker the daemon's sweep after the run,
                # which kills by session, still finds whatever escaped us.
                process_group=0,
            )
        except OSError as exc:
            raise ToolError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
        stdout, stderr = _Output(), _Output()
        try:
            async with trio.open_nursery() as nursery:
                # Read while it runs, so that it never blocks on a full pipe.
                nursery.start_soon(stdout.drain, process.stdout)
                nursery.start_soon(stderr.drain, process.stderr)
                try:
                    exited = await _exits_within(process, timeout_ms / 1000)
                finally:
                    # Exited or not, kill what is left of its group (background children
                    # holding our pipes) before reaping the leader: while it is unreaped
                    # its pid, the group's id, cannot be anyone else's.
                    _kill_group(process.pid)
                    with trio.CancelScope(shield=True):
                        await process.wait()
                # Only a process that left the group (setsid) can still hold the pipes
                # open; it may never close them, so it gets a short grace, not our deadline.
                with trio.move_on_after(READ_GRACE_S):
                    await stdout.ended.wait()
                    await stderr.ended.wait()
                nursery.cancel_scope.cancel()
        finally:
            await trio.aclose_forcefully(process.stdout)
            await trio.aclose_forcefully(process.stderr)
        status = f"exit code {process.returncode}" if exited else f"timed out after {timeout_ms} ms (killed)"
        if not (stdout.ended.is_set() and stderr.ended.is_set()):
            status += (
                f"\n[output still held open by a process that left the command's process group;"
                f" stopped reading {READ_GRACE_S:g} s after the command ended]"
            )
        return f"{status}\n--- stdout ---\n{stdout.text()}\n--- stderr ---\n{stderr.text()}"


class _Output:
    """One output stream of a command: drained to the end, the first OUTPUT_LIMIT bytes kept."""

    def __init__(self) -> None:
        self._kept = bytearray()
        self._total = 0
        self.ended = trio.Event()

    async def drain(self, stream: trio.abc.ReceiveStream) -> None:
        while chunk := await stream.receive_some(65536):
            self._total += len(chunk)
            self._kept += chunk[: OUTPUT_LIMIT - len(self._kept)]
        self.ended.set()

    def text(self) -> str:
        text = _text(bytes(self._kept))
        return text + "\n[output truncated]" if self._total > OUTPUT_LIMIT else text


async def _exits_within(process: trio.Process, timeout_s: float) -> bool:
    """Wait for the process to exit, without reaping it (see `run_command`)."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:  # already reaped: it has exited
        return True
    try:
        with trio.move_on_after(timeout_s):
            await trio.lowlevel.wait_readable(pidfd)
            return True
        return False
    finally:
        os.close(pidfd)


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # nothing left in it


async def call_tool(workspace: Workspace, call: ToolCall, enabled: list[str]) -> ToolResult:
    """Run one tool call; every failure becomes an error result for the model."""

    def error(message: str) -> ToolResult:
        return ToolResult(call.id, call.name, message, is_error=True)

    if call.name not in SPECS:
        return error(f"unknown tool {call.name!r}")
    if call.name not in enabled:
        return error(f"tool {call.name!r} is not enabled for this conversation")
    try:
        arguments = json.loads(call.arguments or "{}")
    except json.JSONDecodeError as exc:
        return error(f"arguments are not valid JSON: {exc}")
    if not isinstance(arguments, dict):
        return error("arguments must be a JSON object")
    allowed = set(SPECS[call.name].parameters["properties"])
    if unknown := set(arguments) - allowed:
        return error(f"unknown arguments: {', '.join(sorted(unknown))}")
    try:
        if call.name == "run_command":
            content = await workspace.run_command(**arguments)
        else:
            function: Callable[..., str] = getattr(workspace, call.name)
            content = await trio.to_thread.run_sync(lambda: function(**arguments))
    except ToolError as exc:
        return error(str(exc))
    except TypeError as exc:  # a missing required argument
        return error(f"bad arguments: {exc}")
    except OSError as exc:
        return error(f"{call.name} failed: {exc.strerror or exc}")
    return ToolResult(call.id, call.name, content)

