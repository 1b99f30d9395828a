"""The edges of the daemon: who may serve on an endpoint, what a frame may hold, and
how a start that cannot go ahead says why."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys

import msgspec
import pytest

from conftest import Daemon, wait_for_exit
from genvisor.errors import BadRequest, NotFound
from genvisor.ipc.frames import Failure
from raw_peer import RawPeer


def _serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "genvisor", "serve", *args], capture_output=True, text=True, timeout=timeout)


# ---- one daemon per endpoint ------------------------------------------------------


def test_a_second_daemon_on_a_live_endpoint_is_refused_and_the_first_serves_on(daemon, tmp_path):
    other_state = tmp_path / "other-state"
    result = _serve("--endpoint", daemon.endpoint, "--state-dir", str(other_state))
    assert result.returncode == 2
    assert f"another genvisor daemon (pid {daemon.pid}) is serving on {daemon.endpoint}" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.path.exists(daemon.endpoint.removeprefix("ipc://"))
    with daemon.client() as client:
        assert client.ping().pid == daemon.pid


def test_a_socket_left_by_a_killed_daemon_is_taken_over(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Daemon(tmp_path / "a").start()
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(timeout=30)
    assert not wait_for_exit([p.pid for p in first.descendants()], timeout_s=10)
    assert os.path.exists(first.endpoint.removeprefix("ipc://"))  # stale: nobody listens
    second = Daemon(tmp_path / "b")
    second.endpoint = first.endpoint
    second.start()
    try:
        with second.client() as client:
            assert client.ping().pid == second.pid
    finally:
        assert second.stop() == 0


def test_an_endpoint_another_program_listens_on_is_refused(tmp_path):
    path = tmp_path / "run" / "genvisor.sock"
    path.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen()
        result = _serve("--endpoint", f"ipc://{path}", "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2
    assert "something is already listening" in result.stderr
    assert "Traceback" not in result.stderr


# ---- frames -----------------------------------------------------------------------


def _deep(depth: int):
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value


def _deep_frame(request_id: int, depth: int) -> bytes:
    """A send_user_message whose metadata nests `depth` arrays, in raw msgpack (msgspec
    itself refuses to encode what is deeper than its stack)."""
    head = msgspec.msgpack.encode({"v": 1, "id": request_id})
    body = msgspec.msgpack.encode({"op": "send_user_message", "loc": [None, "deep"], "content": "hi"})
    # Re-open the req map with one more entry: metadata → depth × fixarray(1) → 1.
    req = bytes([body[0] + 1]) + body[1:] + msgspec.msgpack.encode("metadata") + b"\x91" * depth + b"\x01"
    return bytes([head[0] + 1]) + head[1:] + msgspec.msgpack.encode("req") + req


@pytest.mark.parametrize("depth", [65, 1_000, 100_000])
def test_a_frame_nested_too_deep_is_answered_bad_request_and_changes_nothing(shared_daemon, depth):
    with RawPeer(shared_daemon.endpoint) as peer:
        peer.send(_deep_frame(4242, depth))
        answer = peer.answer()
    assert isinstance(answer, Failure) and answer.id == 4242
    assert answer.error.code == BadRequest.code
    with shared_daemon.client() as client:
        with pytest.raises(NotFound):
            client.conversation("deep")


def test_metadata_within_the_nesting_limit_is_kept(shared_daemon, conv):
    with shared_daemon.client() as client:
        client.send_user_message(conv, "hi", metadata={"deep": _deep(60)})
        assert client.conversation_messages(conv)[0].metadata == {"deep": _deep(60)}


@pytest.mark.parametrize("loc", [[None, "x", "junk", 42], [None, "x", None], ["p", "x", "y"]])
def test_a_locator_with_extra_parts_is_refused(shared_daemon, loc):
    frame = msgspec.msgpack.encode({"v": 1, "id": 9, "req": {"op": "send_user_message", "loc": loc, "content": "hi"}})
    with RawPeer(shared_daemon.endpoint) as peer:
        peer.send(frame)
        answer = peer.answer()
    assert isinstance(answer, Failure) and answer.id == 9 and answer.error.code == BadRequest.code
    with shared_daemon.client() as client:
        with pytest.raises(NotFound):
            client.conversation("x")


# ---- a start that cannot go ahead -------------------------------------------------


def test_a_corrupted_journal_is_refused_with_one_line(tmp_path):
    daemon = Daemon(tmp_path).start()
    with daemon.client() as client:
        for n in range(200):  # enough rows for pages beyond the first
            client.send_user_message(f"c{n}", "x" * 500)
    assert daemon.stop() == 0
    journal = tmp_path / "state" / "journal.sqlite3"
    with sqlite3.connect(journal) as db:
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
    assert pages > 4
    with open(journal, "r+b") as f:  # scribble over every page but the first (the header)
        for page in range(1, pages):
            f.seek(page * page_size)
            f.write(b"\xde\xad" * (page_size // 2))
    result = _serve(*daemon.command()[4:])
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("genvisor serve: cannot read the journal"), result.stderr


@pytest.mark.parametrize("state_dir", ["/sys/kernel", "/sys/genvisor-cannot-exist"])
def test_a_state_dir_that_cannot_be_written_is_refused_with_one_line(tmp_path, state_dir):
    result = _serve("--endpoint", f"ipc://{tmp_path}/run/genvisor.sock", "--state-dir", state_dir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"genvisor serve: cannot use the state dir {state_dir}"), result.stderr


def test_a_socket_dir_that_cannot_be_made_is_refused_with_one_line(tmp_path):
    result = _serve("--endpoint", "ipc:///sys/genvisor-cannot-exist/genvisor.sock", "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot make the socket's directory" in lines[0], result.stderr


@pytest.mark.parametrize("call", [
    lambda c, conv: c.send_user_message(conv, "hi", metadata={1.5: "x"}),
    lambda c, conv: c.record_assistant_message(conv, "hi", metadata={"ok": {None: 1}}),
    lambda c, conv: c.start_conversation(conv, metadata={1: "x"}),
    lambda c, conv: c.configure_llm(conv, options={1: 2}),
    lambda c, conv: c.configure_mode(conv, "coding", {"system_prompt": "x", True: 1}),
    lambda c, conv: c.send_user_message(conv, "hi", metadata={"blob": [b"\x00\x01"]}),
], ids=["float_key", "nested_none_key", "conversation_int_key", "options_int_key", "mode_state_bool_key", "bytes"])
def test_a_free_form_value_that_is_not_json_like_is_refused_and_the_journal_stays_readable(daemon, conv, call):
    """A key that is not a string would be journaled and then make every answer about
    the conversation undecodable — and the journal unreadable at the next start."""
    with daemon.client() as client:
        with pytest.raises(BadRequest):
            call(client, conv)
        with pytest.raises(NotFound):
            client.conversation(conv)
        client.send_user_message(conv, "fine", metadata={"nested": {"k": [1, "two", None]}})
    assert daemon.stop() == 0
    daemon.start()
    with daemon.client() as client:
        assert [m.content for m in client.conversation_messages(conv)] == ["fine"]
