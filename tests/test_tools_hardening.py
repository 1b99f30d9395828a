"""The coding tools under hostile input: commands that leave children behind, arguments
no tool expects, files too big to read whole, and a workspace whose directories change
under the tool. Each case is checked on the tool functions and, end to end, through a
run whose model must see a tool result (never a crashed or hung run)."""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
import trio
from hypothesis import given, settings, strategies as st

from conftest import wait_until
from genvisor.modes import workspace_fs
from genvisor.modes.tools import (
    EDIT_LIMIT,
    READ_LIMIT,
    SPECS,
    ToolError,
    Workspace,
    call_tool,
)
from genvisor.types import ToolCall, ToolResult

ALL_TOOLS = list(SPECS)
_tags = itertools.count(1)


def _workspace(tmp_path: Path, *, opener: workspace_fs.Opener = workspace_fs.open_beneath) -> Workspace:
    root = tmp_path / "ws"
    root.mkdir(exist_ok=True)
    return Workspace(root, opener=opener)


async def _call(workspace: Workspace, name: str, arguments: dict | str) -> ToolResult:
    raw = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return await call_tool(workspace, ToolCall("t1", name, raw), ALL_TOOLS)


def _sleep_tag() -> str:
    """A `sleep` argument no other process on the machine has: how a test finds what a
    command left running."""
    return f"2000{os.getpid()}{next(_tags):03d}"


def _sleeping(tag: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info["cmdline"] == ["sleep", tag] and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def _wait_gone(tag: str, timeout_s: float = 5.0) -> None:
    """Poll until no live `sleep TAG` is left (a zombie holds nothing: it counts as gone)."""
    wait_until(lambda: not _sleeping(tag), timeout_s, lambda: f"sleep {tag} to be gone (still running: {_sleeping(tag)})")


def _run_tools(client, conv: str, workspace: Path, calls: list[dict], skills: list[str] = ALL_TOOLS, timeout_ms: int = 20_000,
               excludes: list[str] = ()):
    """Drive `calls` (one model turn) through a real run, then a final answer; returns
    the run's result and the tool messages committed to the conversation."""
    script = [{"tool_calls": calls}, {"text": "done"}]
    client.start_conversation(conv, metadata={"workspace": str(workspace), "workspace_excludes": list(excludes)})
    client.configure_skills(conv, skills)
    _, result = client.send_and_generate(
        conv, "go", generation_opts={"backend_opts": {"script": script}, "timeout_ms": timeout_ms},
        await_opts={"timeout_ms": timeout_ms + 10_000},
    )
    return result, [m for m in client.conversation_messages(conv) if m.role == "tool"]


# ---- 7: a command's timeout bounds the whole call ------------------------------------


async def test_a_background_child_holding_the_output_does_not_hold_the_call(tmp_path):
    workspace = _workspace(tmp_path)
    tag = _sleep_tag()
    started = time.monotonic()
    with trio.fail_after(10):
        output = await workspace.run_command(["sh", "-c", f"sleep {tag} & echo started"], timeout_ms=1000)
    assert time.monotonic() - started < 3
    assert output.startswith("exit code 0") and "started" in output
    _wait_gone(tag)  # it was in the command's process group, killed when the command exited


async def test_a_command_past_its_timeout_is_killed_with_its_group_and_says_so(tmp_path):
    workspace = _workspace(tmp_path)
    tag = _sleep_tag()
    with trio.fail_after(10):
        output = await workspace.run_command(["sh", "-c", f"echo before; sleep {tag} & exec sleep {tag}"], timeout_ms=300)
    assert output.startswith("timed out after 300 ms") and "before" in output
    _wait_gone(tag)


async def test_a_process_that_left_the_group_cannot_hold_the_call_past_the_read_grace(tmp_path):
    workspace = _workspace(tmp_path)
    tag = _sleep_tag()
    fifo = tmp_path / "escaped.fifo"
    os.mkfifo(fifo)
    # setsid -f: the sleep escapes into a session of its own, keeping our pipes open. It
    # says so on the FIFO once out, and only then does the command end.
    escape = f"setsid -f sh -c 'echo out > {fifo}; exec sleep {tag}'; cat {fifo} > /dev/null; echo started"
    started = time.monotonic()
    try:
        with trio.fail_after(10):
            output = await workspace.run_command(["sh", "-c", escape], timeout_ms=5000)
        assert time.monotonic() - started < 3  # the read grace, not the timeout
        assert output.startswith("exit code 0") and "started" in output
        assert "still held open" in output
    finally:
        for proc in _sleeping(tag):  # in a worker the daemon's sweep would; here nobody else does
            proc.kill()


async def test_a_command_writing_more_than_the_cap_is_truncated_and_not_blocked(tmp_path):
    workspace = _workspace(tmp_path)
    with trio.fail_after(10):
        output = await workspace.run_command(["sh", "-c", "head -c 1000000 /dev/zero | tr '\\0' x; echo; echo err >&2"])
    assert output.startswith("exit code 0") and "[output truncated]" in output and "err" in output


async def test_a_canceled_call_leaves_no_process_behind(tmp_path):
    workspace = _workspace(tmp_path)
    tag = _sleep_tag()
    with trio.move_on_after(0.5):
        await workspace.run_command(["sh", "-c", f"sleep {tag} & exec sleep {tag}"], timeout_ms=60_000)
    _wait_gone(tag)


def test_a_run_whose_command_leaves_a_child_completes(connect, conv, tmp_path):
    tag = _sleep_tag()
    call = {"name": "run_command", "arguments": {"argv": ["sh", "-c", f"sleep {tag} & echo started"], "timeout_ms": 1000}}
    started = time.monotonic()
    with connect() as client:
        result, tools = _run_tools(client, conv, tmp_path / "ws", [call], skills=["run_command"])
    assert time.monotonic() - started < 10
    assert result.text == "done"
    assert tools[0].content.startswith("exit code 0") and "started" in tools[0].content
    _wait_gone(tag)




# ---- 9: the workspace check cannot be raced ------------------------------------------

HAS_OPENAT2 = workspace_fs._probe_openat2()
# Both ways of opening beneath the root, on this kernel: the tools must hold with either.
OPENERS = [
    pytest.param(workspace_fs.openat2_beneath, id="openat2", marks=pytest.mark.skipif(not HAS_OPENAT2, reason="no openat2")),
    pytest.param(workspace_fs.walk_beneath, id="walk"),
]

_libc = ctypes.CDLL(None, use_errno=True)
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> None:
    """Swap two names atomically (renameat2 RENAME_EXCHANGE): both always exist."""
    if _libc.renameat2(-100, os.fsencode(a), -100, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")


def _files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.fixture
def outside(tmp_path):
    """A directory next to the workspace, holding a secret no tool may read or change."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "secret").write_text("TOPSECRET\n")
    return directory


@pytest.mark.parametrize("opener", OPENERS)
async def test_a_directory_that_is_a_symlink_out_is_refused_by_every_tool(tmp_path, outside, opener):
    workspace = _workspace(tmp_path, opener=opener)
    (workspace.root / "sub").symlink_to(outside)
    (workspace.root / "rel").symlink_to(os.path.relpath(outside, workspace.root))  # ../outside
    for sub in ("sub", "rel"):
        for name, arguments in [
            ("write_file", {"path": f"{sub}/x", "content": "x"}),
            ("write_file", {"path": f"{sub}/new/x", "content": "x"}),
            ("read_file", {"path": f"{sub}/secret"}),
            ("edit_file", {"path": f"{sub}/secret", "old": "TOP", "new": "NOT"}),
            ("list_dir", {"path": sub}),
            ("search_text", {"text": "SECRET", "path": sub}),
        ]:
            result = await _call(workspace, name, arguments)
            assert result.is_error and "outside the workspace" in result.content, (name, arguments, result)
    listing = await _call(workspace, "list_dir", {})
    assert sorted(listing.content.split("\n")) == ["rel@", "sub@"]  # listed, not followed
    assert (await _call(workspace, "search_text", {"text": "SECRET"})).content == "no matches"
    assert _files_under(outside) == ["secret"] and (outside / "secret").read_text() == "TOPSECRET\n"


@pytest.mark.parametrize("opener", OPENERS)
@pytest.mark.parametrize("path", ["..", "../outside/secret", "a/../../outside/secret", "./../outside", "a/b/../../.."])
async def test_dot_dot_above_the_root_is_refused(tmp_path, outside, opener, path):
    workspace = _workspace(tmp_path, opener=opener)
    (workspace.root / "a" / "b").mkdir(parents=True)
    for name, arguments in [("read_file", {"path": path}), ("list_dir", {"path": path}), ("write_file", {"path": path + "/x", "content": "x"})]:
        result = await _call(workspace, name, arguments)
        assert result.is_error and "outside the workspace" in result.content, (name, result)
    assert _files_under(outside) == ["secret"]


@pytest.mark.parametrize("opener", OPENERS)
async def test_symlinks_that_stay_inside_keep_working(tmp_path, opener):
    workspace = _workspace(tmp_path, opener=opener)
    root = workspace.root
    (root / "real" / "deep").mkdir(parents=True)
    (root / "real" / "deep" / "f.txt").write_text("hello\n")
    (root / "link").symlink_to("real/deep")
    (root / "real" / "up").symlink_to("../real")  # climbs, but stays inside
    (root / "chain").symlink_to("link")
    (root / "dangling").symlink_to("real/made.txt")
    assert (await _call(workspace, "read_file", {"path": "chain/f.txt"})).content == "hello\n"
    assert (await _call(workspace, "read_file", {"path": "real/up/up/deep/../deep/f.txt"})).content == "hello\n"
    assert (await _call(workspace, "list_dir", {"path": "link"})).content == "f.txt"
    assert (await _call(workspace, "edit_file", {"path": "link/f.txt", "old": "hello", "new": "bye"})).is_error is False
    assert not (await _call(workspace, "write_file", {"path": "link/new/g.txt", "content": "g"})).is_error
    assert not (await _call(workspace, "write_file", {"path": "dangling", "content": "made"})).is_error
    assert (root / "real" / "deep" / "f.txt").read_text() == "bye\n"
    assert (root / "real" / "deep" / "new" / "g.txt").read_text() == "g"
    assert (root / "real" / "made.txt").read_text() == "made" and (root / "dangling").is_symlink()
    found = await _call(workspace, "search_text", {"text": "bye"})
    assert found.content == "real/deep/f.txt:1: bye"  # symlinked directories are not entered (no cycles)


@pytest.mark.parametrize("opener", OPENERS)
async def test_absolute_paths_and_absolute_symlinks_are_refused(tmp_path, outside, opener):
    """As RESOLVE_BENEATH does: an absolute symlink is refused even when it points
    inside the workspace (make links relative to keep them usable)."""
    workspace = _workspace(tmp_path, opener=opener)
    (workspace.root / "f.txt").write_text("inside")
    (workspace.root / "abs-in").symlink_to(workspace.root / "f.txt")
    (workspace.root / "abs-out").symlink_to(outside / "secret")
    absolute = await _call(workspace, "read_file", {"path": str(outside / "secret")})
    assert absolute.is_error and "absolute" in absolute.content
    for path in ("abs-in", "abs-out"):
        result = await _call(workspace, "read_file", {"path": path})
        assert result.is_error and "outside the workspace" in result.content


@pytest.mark.parametrize("opener", OPENERS)
def test_tools_racing_a_directory_swapped_for_a_symlink_never_reach_outside(tmp_path, outside, opener):
    """`sub` is swapped, as fast as a thread can, between a directory of the workspace and
    a symlink out of it, while the tools write and read through it: no write may land
    outside and no read may see the secret, whatever the interleaving."""
    workspace = _workspace(tmp_path, opener=opener)
    (workspace.root / "sub").mkdir()
    (workspace.root / "sub" / "secret").write_text("public\n")
    (workspace.root / "alt").symlink_to(outside)
    stop = threading.Event()

    def swap() -> None:
        while not stop.is_set():
            _exchange(workspace.root / "sub", workspace.root / "alt")

    swapper = threading.Thread(target=swap)
    swapper.start()
    outcomes = {"written": 0, "read": 0, "refused": 0}
    try:
        for n in range(2000):
            try:
                workspace.write_file(f"sub/f{n}", "x")
                outcomes["written"] += 1
            except ToolError:
                outcomes["refused"] += 1
            try:
                assert "TOPSECRET" not in workspace.read_file("sub/secret")
                outcomes["read"] += 1
            except ToolError:
                outcomes["refused"] += 1
    finally:
        stop.set()
        swapper.join()
    assert _files_under(outside) == ["secret"]
    assert all(outcomes.values()), outcomes  # both sides of the race were seen


_NAMES = ["d", "e", "f", "..", ".", "l0", "l1", "l2", "new", ""]
_paths = st.lists(st.sampled_from(_NAMES), min_size=1, max_size=4).map("/".join).flatmap(
    lambda p: st.sampled_from([p, "/" + p, p + "/"])
)
_FLAGS = [
    os.O_RDONLY, os.O_RDONLY | os.O_DIRECTORY, os.O_PATH, os.O_PATH | os.O_DIRECTORY,
    os.O_WRONLY | os.O_CREAT, os.O_WRONLY | os.O_CREAT | os.O_EXCL, os.O_RDWR,
]


def _tree_with_links(top: str, links: list[str]) -> int:
    """top/outside, and top/root: dirs d and d/e, files f and d/f, symlinks l0, l1, d/l2."""
    os.makedirs(f"{top}/root/d/e")
    for name in ("outside", "root/f", "root/d/f"):
        open(f"{top}/{name}", "w").close()
    for name, target in zip(["l0", "l1", "d/l2"], links, strict=True):
        os.symlink(target or ".", f"{top}/root/{name}")
    return os.open(f"{top}/root", os.O_PATH | os.O_DIRECTORY)


def _outcome(opener: workspace_fs.Opener, links: list[str], path: str, flags: int) -> tuple:
    """What opening `path` does: the errno, or the inode opened and the tree after."""
    with tempfile.TemporaryDirectory() as top:
        root = _tree_with_links(top, links)
        try:
            fd = opener(root, path, flags, 0o644)
        except OSError as exc:
            return ("error", errno.errorcode[exc.errno])
        finally:
            os.close(root)
        info = os.fstat(fd)
        os.close(fd)
        inodes = {os.lstat(p).st_ino: str(p.relative_to(top)) for p in Path(top).rglob("*")}
        return ("opened", inodes.get(info.st_ino, "root"), _files_under(Path(top)))


@pytest.mark.skipif(not HAS_OPENAT2, reason="no openat2 to compare with")
@settings(max_examples=100, deadline=None)
@given(links=st.lists(_paths, min_size=3, max_size=3), path=_paths, flags=st.sampled_from(_FLAGS))
def test_the_walk_opens_what_openat2_opens(links, path, flags):
    """The fallback is the kernel's semantics: same file, same errno, same tree after,
    for paths and symlinks made of `..`, `.`, slashes, loops and names that are missing."""
    assert _outcome(workspace_fs.walk_beneath, links, path, flags) == _outcome(workspace_fs.openat2_beneath, links, path, flags)


def test_a_run_writing_through_a_symlink_out_sees_a_tool_error(connect, conv, tmp_path, outside):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "sub").symlink_to(outside)
    calls = [
        {"name": "write_file", "arguments": {"path": "sub/x", "content": "x"}},
        {"name": "read_file", "arguments": {"path": "sub/secret"}},
    ]
    with connect() as client:
        result, tools = _run_tools(client, conv, workspace, calls)
    assert result.text == "done"
    assert [t.metadata["is_error"] for t in tools] == [True, True]
    assert all("outside the workspace" in t.content for t in tools)
    assert _files_under(outside) == ["secret"]


# ---- 8: no argument a model can send crashes a run -----------------------------------

GIB = 1 << 30


def _hostile_tree(root: Path) -> None:
    """What a workspace may hold that a tool must survive: a symlink loop, a dangling
    symlink, a FIFO (opening it blocks), a file that is not UTF-8, a name that is not
    UTF-8, a sparse 2 GiB file and one just over the edit limit."""
    (root / "dir").mkdir(exist_ok=True)
    (root / "dir" / "ok.txt").write_text("needle in a file\n")
    for name, target in [("loop", "loop"), ("loop2", "dir/../loop2"), ("dangling", "nowhere")]:
        if not (root / name).is_symlink():
            (root / name).symlink_to(target)
    if not (root / "fifo").exists():
        os.mkfifo(root / "fifo")
    (root / "latin1.txt").write_bytes("café needle\n".encode("latin-1"))
    (root / os.fsdecode(b"name-\xff")).write_text("needle under a bad name\n")
    with open(root / "huge.bin", "wb") as f:
        f.truncate(2 * GIB)
    with open(root / "big.txt", "wb") as f:
        f.write(b"needle\n")
        f.truncate(EDIT_LIMIT + 1)


@pytest.fixture
def hostile(tmp_path):
    workspace = _workspace(tmp_path)
    _hostile_tree(workspace.root)
    return workspace


@pytest.mark.parametrize(("name", "arguments", "needle"), [
    ("read_file", {"path": "a\0b"}, "NUL"),
    ("list_dir", {"path": "\0"}, "NUL"),
    ("search_text", {"text": "x", "path": "dir\0"}, "NUL"),
    ("write_file", {"path": "x\0", "content": "x"}, "NUL"),
    ("edit_file", {"path": "dir/ok.txt\0", "old": "a", "new": "b"}, "NUL"),
    ("read_file", {"path": "\ud800"}, "not a valid file name"),
    ("write_file", {"path": "a/\udfff/b", "content": "x"}, "not a valid file name"),
    ("read_file", {"path": "loop"}, "symbolic links"),
    ("write_file", {"path": "loop2", "content": "x"}, "symbolic links"),
    ("list_dir", {"path": "loop/x"}, "symbolic links"),
    ("read_file", {"path": "fifo"}, "is not a file"),
    ("write_file", {"path": "fifo", "content": "x"}, "is not a file"),
    ("edit_file", {"path": "latin1.txt", "old": "caf", "new": "x"}, "not UTF-8"),
    ("edit_file", {"path": "big.txt", "old": "needle", "new": "x"}, "at most 8388608 bytes"),
    ("edit_file", {"path": "dir/ok.txt", "old": "needle", "new": "\ud800"}, "lone surrogate"),
    ("write_file", {"path": "s.txt", "content": "a\ud800"}, "lone surrogate"),
    ("run_command", {"argv": ["echo", "a\0b"]}, "NUL"),
    ("run_command", {"argv": ["echo", "\ud800"]}, "not valid"),
    ("run_command", {"argv": ["true"], "timeout_ms": True}, "timeout_ms"),
], ids=lambda v: v if isinstance(v, str) and v.isidentifier() else None)
async def test_a_hostile_argument_is_a_tool_error(hostile, name, arguments, needle):
    result = await _call(hostile, name, arguments)
    assert result.is_error and needle in result.content, result
    result.content.encode("utf-8")  # what the run sends on must be encodable


async def test_a_2_gib_file_is_read_up_to_the_limit_only(hostile):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    result = await _call(hostile, "read_file", {"path": "huge.bin"})
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert not result.is_error
    assert result.content.endswith(f"[truncated: {2 * GIB} bytes, first {READ_LIMIT} shown]")
    assert grown_mib < 64, f"reading it grew the peak RSS by {grown_mib:.0f} MiB"


async def test_search_survives_loops_fifos_bad_names_and_big_files(hostile):
    with trio.fail_after(10):  # a FIFO opened for reading would block forever
        result = await _call(hostile, "search_text", {"text": "needle"})
    assert not result.is_error
    # The bad name is shown escaped; the latin-1 file is not text, the 8 MiB one too big.
    assert result.content.splitlines() == ["dir/ok.txt:1: needle in a file", "name-\\udcff:1: needle under a bad name"]
    for text in ("\0", "\ud800", "needle\0"):
        assert (await _call(hostile, "search_text", {"text": text})).content == "no matches"


async def test_names_that_are_not_utf8_come_back_encodable(hostile):
    listing = await _call(hostile, "list_dir", {})
    assert "name-\\udcff" in listing.content.splitlines()
    written = await _call(hostile, "write_file", {"path": "new-\udcfe", "content": "x"})
    assert not written.is_error and written.content == "wrote 1 bytes to new-\\udcfe"
    assert (hostile.root / os.fsdecode(b"new-\xfe")).read_text() == "x"


@pytest.mark.parametrize("raw", ["{", "[]", "null", "[" * 100_000, '{"path": ' + "1" * 5000 + "}", '{"path": NaN}'])
async def test_arguments_that_are_not_a_json_object_are_a_tool_error(hostile, raw):
    result = await _call(hostile, "read_file", raw)
    assert result.is_error and ("arguments" in result.content or "path" in result.content), result


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(st.characters(exclude_categories=())),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8,
)
# Strings a model might aim at the tree above, hostile or not.
_aimed = st.sampled_from(["", ".", "..", "/", "/etc/passwd", "dir", "dir/ok.txt", "loop", "loop2/x", "fifo", "dangling",
                          "huge.bin", "big.txt", "latin1.txt", "a\0b", "\ud800", "name-\udcff", "new/deep/file", "dir/"])


def _arguments(tool: str) -> st.SearchStrategy[dict]:
    keys = list(SPECS[tool].parameters["properties"])
    value = st.one_of(_aimed, _json, st.lists(_aimed | _json, max_size=3))
    return st.dictionaries(st.sampled_from(keys + ["extra"]), value, max_size=len(keys) + 1).map(_harmless)


def _harmless(arguments: dict) -> dict:
    """Whatever argv a model sends, run `true` (which ignores its arguments), not
    something generated; a timeout that is valid stays short."""
    argv = arguments.get("argv")
    if isinstance(argv, list) and argv and isinstance(argv[0], str):
        arguments["argv"] = ["true", *argv[1:]]
    if isinstance(arguments.get("timeout_ms"), int):
        arguments["timeout_ms"] = min(arguments["timeout_ms"], 5000)
    return arguments


@pytest.fixture(scope="module")
def hostile_module(tmp_path_factory):
    workspace = _workspace(tmp_path_factory.mktemp("hostile"))
    _hostile_tree(workspace.root)
    return workspace


@pytest.mark.parametrize("tool", ALL_TOOLS)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_call_tool_answers_any_json_arguments_with_a_result(hostile_module, tool, data):
    arguments = data.draw(_arguments(tool) | _json)
    # Escaped or not: in-process, the JSON text may hold the lone surrogates themselves.
    raw = json.dumps(arguments, ensure_ascii=data.draw(st.booleans()))
    result = trio.run(_call, hostile_module, tool, raw)
    assert isinstance(result, ToolResult)
    assert "internal error" not in result.content, result
    result.content.encode("utf-8")


def test_a_run_fed_hostile_calls_completes_and_the_model_sees_each_error(connect, conv, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    _hostile_tree(workspace)
    # Raw JSON text: a lone surrogate cannot travel in a client's request, only as the
    # \\ud800 escape a model would write.
    calls = [
        {"name": "read_file", "arguments": {"path": "a\0b"}},
        {"name": "read_file", "arguments": {"path": "loop"}},
        {"name": "edit_file", "arguments": {"path": "latin1.txt", "old": "caf", "new": "x"}},
        {"name": "write_file", "arguments": '{"path": "s.txt", "content": "\\ud800"}'},
        {"name": "edit_file", "arguments": {"path": "big.txt", "old": "needle", "new": "x"}},
        {"name": "read_file", "arguments": "[" * 100_000},
        {"name": "read_file", "arguments": {"path": "huge.bin"}},
        {"name": "list_dir", "arguments": {}},
        {"name": "search_text", "arguments": {"text": "needle"}},
    ]
    with connect() as client:
        # A snapshot reads every file (a 2 GiB one for seconds, twice: before and after
        # the turn); a file this size is what `workspace_excludes` is for.
        result, tools = _run_tools(client, conv, workspace, calls, skills=ALL_TOOLS, excludes=["/huge.bin"])
    assert result.text == "done"
    assert [t.metadata["is_error"] for t in tools] == [True] * 6 + [False] * 3
    for tool, needle in zip(tools[:6], ["NUL", "symbolic links", "not UTF-8", "lone surrogate", "at most", "not valid JSON"], strict=True):
        assert needle in tool.content, (needle, tool.content)
    assert tools[6].content.endswith(f"[truncated: {2 * GIB} bytes, first {READ_LIMIT} shown]")
    assert "name-\\udcff" in tools[7].content.splitlines() and "loop@" in tools[7].content.splitlines()
    assert "dir/ok.txt:1: needle in a file" in tools[8].content
