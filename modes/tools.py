"""The coding tools: files and commands, confined to the conversation's workspace.

Every path a model names is opened beneath the workspace's directory fd in one step
(`workspace_fs.open_beneath`: symlinks are followed only while they stay inside), and
every access goes through the fd so obtained: nothing is checked by name and then
opened by name, which a swap in between could redirect. A path that leads out is
refused with a `ToolError`, which becomes a tool result the model sees — a tool's
failure is not the run's. `run_command` runs an argv (no
shell) in the workspace, in a process group of its own that is killed when the command
ends; its timeout bounds the whole call, reading the output included (see
`Workspace.run_command`). It stays in the worker's session, so whatever ends a run, the
daemon's sweep of that session ends the run's commands too.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import trio

from genvisor.modes.workspace_fs import Opener, open_beneath
from genvisor.types import ToolCall, ToolResult

READ_LIMIT = 256 * 1024  # bytes of a file returned to the model
EDIT_LIMIT = 8 * 1024 * 1024  # bytes of a file edit_file edits (it reads it whole)
OUTPUT_LIMIT = 64 * 1024  # bytes of a command's stdout and of its stderr
LIST_LIMIT = 1_000
SEARCH_LIMIT = 200
SEARCH_FILE_LIMIT = 2 * 1024 * 1024  # larger files are not searched
SEARCH_DEPTH_LIMIT = 64  # directories nested deeper are not searched
COMMAND_TIMEOUT_MS = 60_000
COMMAND_TIMEOUT_MAX_MS = 600_000
# After a command ends, how long we still read output a process it started keeps open.
READ_GRACE_S = 0.5

# The default skills profile: what a conversation may do until configure_skills says
# otherwise. Running commands is opt-in: it reaches beyond the workspace's files.
DEFAULT_SKILLS = ["read_file", "list_dir", "search_text", "write_file", "edit_file"]

log = logging.getLogger(__name__)


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
        ToolSpec(
            "list_dir", "List a directory of the workspace (directories end with /, symlinks with @).", _schema([], path=_STR)
        ),
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
    """The tools of one run, confined to `root`.

    Every file access is through an fd that `opener` (see `workspace_fs`) got beneath
    the root's fd — never a path opened by name after a check, which a symlink swapped
    in between could redirect outside."""

    def __init__(self, root: str | Path, *, opener: Opener = open_beneath) -> None:
        self.root = Path(root).resolve()
        self._opener = opener

    # ---- opening beneath the root ------------------------------------------------------

    @contextmanager
    def _root_fd(self) -> Iterator[int]:
        fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY)
        try:
            yield fd
        finally:
            os.close(fd)

    def _open_in(self, root: int, path: str, flags: int, mode: int = 0o666, *, named: str | None = None) -> int:
        """An fd for `path` beneath `root`, or a ToolError (about `named`, the path the
        model gave) saying why not."""
        if not flags & os.O_PATH:  # which takes no other flags; a tty must not become ours
            flags |= os.O_NOCTTY
        try:
            return self._opener(root, path, flags, mode)
        except OSError as exc:
            raise _refusal(named if named is not None else path, exc) from None

    @contextmanager
    def _open(self, path: Any, flags: int) -> Iterator[int]:
        relative = _relative_path(path)
        with self._root_fd() as root:
            fd = self._open_in(root, relative, flags)
        try:
            yield fd
        finally:
            os.close(fd)

    # ---- the tools ---------------------------------------------------------------------

    def read_file(self, path: str) -> str:
        with self._open(path, os.O_RDONLY | os.O_NONBLOCK) as fd:  # a FIFO must not block us
            size = _regular_size(fd, path)
            data = _read_at_most(fd, READ_LIMIT + 1)  # one more: was there more?
        text = data[:READ_LIMIT].decode("utf-8", errors="replace")
        if len(data) <= READ_LIMIT:
            return text
        return f"{text}\n[truncated: {max(size, len(data))} bytes, first {READ_LIMIT} shown]"

    def list_dir(self, path: str = ".") -> str:
        with self._open(path, os.O_RDONLY | os.O_DIRECTORY) as fd, os.scandir(fd) as entries:
            names = sorted(_listed_name(entry) for entry in entries)
        shown = names[:LIST_LIMIT]
        return "\n".join(shown) + (f"\n[{len(names) - LIST_LIMIT} more]" if len(names) > LIST_LIMIT else "")

    def search_text(self, text: str, path: str = ".") -> str:
        if not isinstance(text, str) or not text:
            raise ToolError("text must be a non-empty string")
        relative = _relative_path(path)
        where = relative.rstrip("/") or "."
        hits: list[str] = []
        with self._root_fd() as root:
            start = self._open_in(root, relative, os.O_RDONLY | os.O_NONBLOCK)
            try:
                if stat.S_ISDIR(os.fstat(start).st_mode):
                    self._search_tree(root, start, where, text, hits, depth=0)
                else:
                    _search_file(start, where, text, hits)
            finally:
                os.close(start)
        if len(hits) >= SEARCH_LIMIT:
            return "\n".join(hits[:SEARCH_LIMIT]) + "\n[more matches not shown]"
        return "\n".join(hits) or "no matches"

    def _search_tree(self, root: int, directory: int, where: str, text: str, hits: list[str], depth: int) -> None:
        """Search the files beneath `directory` (named `where`), in name order. Directories
        are entered by fd, never through a symlink (so no cycle); a symlink to a file is
        opened beneath the root by its path, so one that leads out is skipped."""
        with os.scandir(directory) as scan:
            entries = sorted((entry.name, _kind(entry)) for entry in scan)
        for name, kind in entries:
            if len(hits) >= SEARCH_LIMIT:
                return
            named = name if where == "." else f"{where}/{name}"
            try:
                if kind == "dir":
                    if depth >= SEARCH_DEPTH_LIMIT:
                        continue
                    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory)
                elif kind == "symlink":
                    fd = self._opener(root, named, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY, 0)
                else:
                    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW, dir_fd=directory)
            except OSError:
                continue  # gone, unreadable, or a symlink out of the workspace
            try:
                if kind == "dir":
                    self._search_tree(root, fd, named, text, hits, depth + 1)
                else:
                    _search_file(fd, named, text, hits)
            finally:
                os.close(fd)

    def write_file(self, path: str, content: str) -> str:
        if not isinstance(content, str):
            raise ToolError("content must be a string")
        data = _utf8(content, "content")
        relative = _relative_path(path)
        with self._root_fd() as root:
            self._make_parents(root, relative, named=path)
            # Not O_TRUNC: what the name is (a FIFO, a device) is checked on the fd first.
            fd = self._open_in(root, relative, os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK, 0o666)
        try:
            _regular_size(fd, path)
            os.ftruncate(fd, 0)
            _write_all(fd, data)
        finally:
            os.close(fd)
        return f"wrote {len(data)} bytes to {os.path.normpath(relative)}"

    def _make_parents(self, root: int, relative: str, *, named: str) -> None:
        """mkdir -p for the directories of `relative`, each made by mkdirat in the fd of
        its parent (which mkdirat never follows out of)."""
        parent = os.open(".", os.O_PATH | os.O_DIRECTORY, dir_fd=root)
        prefix = ""
        try:
            for part in relative.split("/")[:-1]:
                if part in ("", "."):
                    continue
                prefix += part + "/"
                try:
                    here = self._opener(root, prefix, os.O_PATH | os.O_DIRECTORY, 0)
                except FileNotFoundError:
                    try:
                        os.mkdir(part, dir_fd=parent)
                    except FileExistsError:
                        pass  # made meanwhile, or a dangling symlink: the open below says
                    here = self._open_in(root, prefix, os.O_PATH | os.O_DIRECTORY, named=named)
                except OSError as exc:
                    raise _refusal(named, exc) from None
                os.close(parent)
                parent = here
        finally:
            os.close(parent)

    def edit_file(self, path: str, old: str, new: str) -> str:
        if not isinstance(old, str) or not old or not isinstance(new, str):
            raise ToolError("old must be a non-empty string and new a string")
        with self._open(path, os.O_RDWR | os.O_NONBLOCK) as fd:
            text = _text_to_edit(fd, path)
            count = text.count(old)
            if count == 0:
                raise ToolError(f"the text to replace was not found in {path!r}")
            if count > 1:
                raise ToolError(f"the text to replace occurs {count} times in {path!r}; include more context to make it unique")
            data = _utf8(text.replace(old, new, 1), "new")
            # The same fd: the file edited is the file read.
            os.lseek(fd, 0, os.SEEK_SET)
            _write_all(fd, data)
            os.ftruncate(fd, len(data))
        return f"edited {os.path.normpath(path)}"

    async def run_command(self, argv: list[str], timeout_ms: int = COMMAND_TIMEOUT_MS) -> str:
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ToolError("argv must be a non-empty list of strings")
        for argument in argv:
            _check_argument(argument)
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
        assert process.stdout is not None and process.stderr is not None  # both are pipes
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


def _relative_path(path: Any) -> str:
    if not isinstance(path, str) or not path.strip():
        raise ToolError("path must be a non-empty string")
    if "\0" in path:
        raise ToolError(f"{path!r} contains a NUL byte, which no file name can")
    try:
        os.fsencode(path)  # a file name is bytes: surrogate escapes are, lone surrogates not
    except UnicodeEncodeError:
        raise ToolError(f"{path!r} is not a valid file name (a lone surrogate)") from None
    if os.path.isabs(path):
        raise ToolError(f"{path!r} is absolute; paths are relative to the workspace")
    return path


def _check_argument(argument: str) -> None:
    """What exec would refuse (a NUL) or could not even encode (a lone surrogate)."""
    if "\0" in argument:
        raise ToolError(f"argv is not valid: {argument!r} contains a NUL byte, which no argument can")
    try:
        os.fsencode(argument)
    except UnicodeEncodeError:
        raise ToolError(f"argv is not valid: {argument!r} holds a lone surrogate") from None


def _text_to_edit(fd: int, path: str) -> str:
    """The file's text, if it is small enough to hold whole and is UTF-8."""
    too_big = f"{path!r} is too big to edit: edit_file edits files of at most {EDIT_LIMIT} bytes"
    if _regular_size(fd, path) > EDIT_LIMIT:
        raise ToolError(too_big)
    data = _read_at_most(fd, EDIT_LIMIT + 1)
    if len(data) > EDIT_LIMIT:  # it grew since the fstat
        raise ToolError(too_big)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ToolError(f"{path!r} is not UTF-8 text (byte {exc.start}); edit_file edits text files only") from None


def _utf8(text: str, name: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ToolError(f"{name} is not valid Unicode text: a lone surrogate at index {exc.start}") from None


def _printable(text: str) -> str:
    """`text` as valid UTF-8: names that are not (a byte \\xff, decoded as the surrogate
    escape \\udcff) shown escaped, or the run could not send the result on."""
    return text.encode("utf-8", errors="backslashreplace").decode("utf-8")


def _refusal(path: str, exc: OSError) -> ToolError:
    if exc.errno == errno.EXDEV:  # what RESOLVE_BENEATH (and our walk) answer to a way out
        return ToolError(f"{path!r} resolves outside the workspace (absolute symlinks count as outside)")
    if exc.errno == errno.ENOENT:
        return ToolError(f"{path!r} does not exist")
    if exc.errno == errno.ENXIO:  # a FIFO nobody reads, a socket
        return ToolError(f"{path!r} is not a file")
    return ToolError(f"{path!r}: {exc.strerror or exc}")


def _regular_size(fd: int, path: str) -> int:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise ToolError(f"{path!r} is not a file")
    return info.st_size


def _read_at_most(fd: int, limit: int) -> bytes:
    """Up to `limit` bytes from `fd`: never more than that in memory, however big the file."""
    data = bytearray()
    while len(data) < limit and (chunk := os.read(fd, min(limit - len(data), 1 << 20))):
        data += chunk
    return bytes(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _kind(entry: os.DirEntry[str]) -> str:
    if entry.is_symlink():
        return "symlink"
    return "dir" if entry.is_dir(follow_symlinks=False) else "file"


def _listed_name(entry: os.DirEntry[str]) -> str:
    """`name/` for a directory, `name@` for a symlink (not followed: it may lead out)."""
    return entry.name + {"dir": "/", "symlink": "@", "file": ""}[_kind(entry)]


def _search_file(fd: int, named: str, text: str, hits: list[str]) -> None:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > SEARCH_FILE_LIMIT:
        return  # a FIFO, a device, a directory a symlink leads to; or too big to search
    try:
        data = _read_at_most(fd, SEARCH_FILE_LIMIT + 1)
        lines = data.decode("utf-8").splitlines() if len(data) <= SEARCH_FILE_LIMIT else []
    except (UnicodeDecodeError, OSError):
        return  # not text, or unreadable
    hits += [f"{named}:{n}: {line}" for n, line in enumerate(lines, 1) if text in line]


async def call_tool(workspace: Workspace, call: ToolCall, enabled: list[str]) -> ToolResult:
    """Run one tool call; every failure becomes an error result for the model. Nothing a
    model sends makes it raise."""

    def result(content: str, is_error: bool = False) -> ToolResult:
        return ToolResult(call.id, call.name, _printable(content), is_error=is_error)

    if call.name not in SPECS:
        return result(f"unknown tool {call.name!r}", True)
    if call.name not in enabled:
        return result(f"tool {call.name!r} is not enabled for this conversation", True)
    try:
        arguments = json.loads(call.arguments or "{}")
    except (ValueError, RecursionError) as exc:  # not JSON; an int of 5000 digits; [[[[…
        return result(f"arguments are not valid JSON: {exc}", True)
    if not isinstance(arguments, dict):
        return result("arguments must be a JSON object", True)
    allowed = set(SPECS[call.name].parameters["properties"])
    if unknown := set(arguments) - allowed:
        return result(f"unknown arguments: {', '.join(sorted(unknown))}", True)
    try:
        if call.name == "run_command":
            content = await workspace.run_command(**arguments)
        else:
            function: Callable[..., str] = getattr(workspace, call.name)
            content = await trio.to_thread.run_sync(lambda: function(**arguments))
    except ToolError as exc:
        return result(str(exc), True)
    except TypeError as exc:  # a missing required argument
        return result(f"bad arguments: {exc}", True)
    except OSError as exc:
        return result(f"{call.name} failed: {exc.strerror or exc}", True)
    except Exception as exc:  # a bug of ours: still the tool's failure, not the run's
        log.exception("tool %s failed on %r", call.name, call.arguments[:200])
        return result(f"internal error in {call.name}: {type(exc).__name__}", True)
    return result(content)
