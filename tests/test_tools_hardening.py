"""The coding tools under hostile input: commands that leave children behind, arguments
no tool expects, files too big to read whole, and a workspace whose directories change
under the tool. Each case is checked on the tool functions and, end to end, through a
run whose model must see a tool result (never a crashed or hung run)."""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path

import psutil
import pytest
import trio

from genvisor.modes.tools import SPECS, Workspace, call_tool
from genvisor.types import ToolCall, ToolResult

ALL_TOOLS = list(SPECS)
_tags = itertools.count(1)


def _workspace(tmp_path: Path, *, isolated: bool = False) -> Workspace:
    root = tmp_path / "ws"
    root.mkdir(exist_ok=True)
    return Workspace(root, isolated=isolated)


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
    deadline = time.monotonic() + timeout_s
    while alive := _sleeping(tag):
        assert time.monotonic() < deadline, f"still running after {timeout_s}s: {alive}"


def _run_tools(client, conv: str, workspace: Path, calls: list[dict], skills: list[str] = ALL_TOOLS, timeout_ms: int = 20_000):
    """Drive `calls` (one model turn) through a real run, then a final answer; returns
    the run's result and the tool messages committed to the conversation."""
    script = [{"tool_calls": calls}, {"text": "done"}]
    client.start_conversation(conv, metadata={"workspace": str(workspace)})
    client.configure_skills(conv, skills)
    _, result = client.send_and_generate(
        conv, "go", generation_opts={"backend_opts": {"script": script}, "timeout_ms": timeout_ms},
        await_opts={"timeout_ms": timeout_ms + 10_000},
    )
    return result, [m for m in client.conversation_messages(conv) if m.role == "tool"]


# ---- 7: a command's timeout bounds the whole call ------------------------------------


@pytest.mark.parametrize("isolated", [False, True], ids=["in_process", "isolated"])
async def test_a_background_child_holding_the_output_does_not_hold_the_call(tmp_path, isolated):
    workspace = _workspace(tmp_path, isolated=isolated)
    tag = _sleep_tag()
    started = time.monotonic()
    with trio.fail_after(10):
        output = await workspace.run_command(["sh", "-c", f"sleep {tag} & echo started"], timeout_ms=1000)
    assert time.monotonic() - started < 3
    assert output.startswith("exit code 0") and "started" in output
    _wait_gone(tag)  # it was in the command's process group, killed when the command exited


@pytest.mark.parametrize("isolated", [False, True], ids=["in_process", "isolated"])
async def test_a_command_past_its_timeout_is_killed_with_its_group_and_says_so(tmp_path, isolated):
    workspace = _workspace(tmp_path, isolated=isolated)
    tag = _sleep_tag()
    with trio.fail_after(10):
        output = await workspace.run_command(["sh", "-c", f"echo before; sleep {tag} & exec sleep {tag}"], timeout_ms=300)
    assert output.startswith("timed out after 300 ms") and "before" in output
    _wait_gone(tag)


async def test_a_process_that_left_the_group_cannot_hold_the_call_past_the_read_grace(tmp_path):
    workspace = _workspace(tmp_path)
    tag = _sleep_tag()
    started = time.monotonic()
    try:
        with trio.fail_after(10):
            # setsid(1): the sleep escapes into a new session, keeping our pipes open.
            output = await workspace.run_command(["sh", "-c", f"echo started; setsid -f sleep {tag}"], timeout_ms=5000)
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
