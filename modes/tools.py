"""The coding tools: files and commands, confined to the conversation's workspace.

Every path a model names is resolved (symlinks included) and must stay inside the
workspace; anything else is refused with a `ToolError`, which becomes a tool result
the model sees — a tool's failure is not the run's. `run_command` runs an argv (no
shell) in the workspace with a timeout and capped output; in a worker it stays in the
run's process group, so it dies with the run whatever ends it.
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
        self.isolated = isolated  # in a worker: commands stay in the run's process group

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
        if not isinstance(timeout_ms, int) or not 0 < timeout_ms <= COMMAND_TIMEOUT_MAX_MS:
            raise ToolError(f"timeout_ms must be within 1..{COMMAND_TIMEOUT_MAX_MS}")
        try:
            process = await trio.lowlevel.open_process(
                argv,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                # In a worker the command joins the run's process group (the run's end
                # kills it); in-process it gets its own, which we kill ourselves.
                start_new_session=not self.isolated,
            )
        except OSError as exc:
            raise ToolError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None
        outputs: dict[str, bytes] = {}
        timed_out = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read_capped, process.stdout, outputs, "stdout")
                nursery.start_soon(_read_capped, process.stderr, outputs, "stderr")
                with trio.move_on_after(timeout_ms / 1000) as scope:
                    await process.wait()
                timed_out = scope.cancelled_caught
                if timed_out:
                    _kill(process, whole_group=not self.isolated)
                    await process.wait()
        finally:
            if process.returncode is None:  # the run was canceled: leave nothing behind
                _kill(process, whole_group=not self.isolated)
                with trio.CancelScope(shield=True):
                    await process.wait()
            elif not self.isolated:
                _kill(process, whole_group=True)  # what the command left in its group
        status = f"timed out after {timeout_ms} ms (killed)" if timed_out else f"exit code {process.returncode}"
        return f"{status}\n--- stdout ---\n{_text(outputs.get('stdout', b''))}\n--- stderr ---\n{_text(outputs.get('stderr', b''))}"


async def _read_capped(stream: trio.abc.ReceiveStream, outputs: dict[str, bytes], name: str) -> None:
    buffer = bytearray()
    while chunk := await stream.receive_some(65536):
        if len(buffer) <= OUTPUT_LIMIT:
            buffer += chunk  # keep draining past the cap so the command never blocks on a full pipe
    outputs[name] = bytes(buffer[:OUTPUT_LIMIT]) + (b"\n[output truncated]" if len(buffer) > OUTPUT_LIMIT else b"")


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _kill(process: trio.Process, *, whole_group: bool) -> None:
    try:
        if whole_group:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except (ProcessLookupError, PermissionError):
        pass


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

