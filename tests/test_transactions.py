"""Turns are transactions: a run that does not complete leaves its workspace as it was
before its first change — whatever changed it (genvisor's file tools or a command) and
however the run ended (an error, a cancel, a crash, its deadline, a killed daemon)."""

from __future__ import annotations

import signal

import pytest

from conftest import wait_for_exit, wait_until
from genvisor.errors import GenerationCanceled, LLMError

TOOLS = ["read_file", "write_file", "edit_file", "run_command"]


@pytest.fixture
def workspace(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "keep.txt").write_text("ORIGINAL\n")
    (root / "gone.txt").write_text("to be deleted\n")
    return root


def _start(client, conv, workspace) -> None:
    client.start_conversation(conv, metadata={"workspace": str(workspace)})
    client.configure_skills(conv, TOOLS)
    client.send_user_message(conv, "change things")


def _as_it_was(workspace) -> None:
    assert sorted(p.name for p in workspace.iterdir()) == ["gone.txt", "keep.txt"]
    assert (workspace / "keep.txt").read_text() == "ORIGINAL\n"
    assert (workspace / "gone.txt").read_text() == "to be deleted\n"


def _settled(client, conv, timeout_s: float = 20) -> dict:
    """The run's `workspace_restored` note, once it is journaled (after its processes are gone)."""
    notes = wait_until(lambda: [e.data for e in client.conversation_thread_entries(conv) if e.event == "workspace_restored"],
                       timeout_s, "the workspace_restored note")
    return notes[-1]


def _tool(name, **arguments):
    return {"tool_calls": [{"name": name, "arguments": arguments}]}


EDITS = [_tool("write_file", path="keep.txt", content="CHANGED\n"), _tool("write_file", path="new/deep/file.txt", content="new\n"),
         _tool("run_command", argv=["rm", "gone.txt"])]


def test_a_run_that_fails_after_its_file_changes_leaves_the_workspace_as_it_was(connect, conv, workspace):
    with connect() as client:
        _start(client, conv, workspace)
        # Three steps of changes, then the script runs out: the fourth LLM call fails.
        ref = client.generate_assistant_reply(conv, backend_opts={"script": EDITS})
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        note = _settled(client, conv)
        assert client.turn_changes(conv, ref).workspace == "restored"
    assert raised.value.details["workspace"] == "restored"  # the outcome waited for the restore, and says so
    assert note["workspace"] == "restored", note
    assert set(note["paths"]) == {"keep.txt", "new/deep/file.txt", "gone.txt"}
    _as_it_was(workspace)


def test_a_canceled_run_is_undone_after_its_command_is_gone(connect, conv, workspace):
    command = ["sh", "-c", "echo CHANGED > keep.txt; rm gone.txt; mkdir -p made/d; echo x > made/d/f; touch ready; exec sleep 60"]
    with connect() as client:
        _start(client, conv, workspace)
        ref = client.generate_assistant_reply(conv, backend_opts={"script": [_tool("run_command", argv=command), {"text": "no"}]})
        wait_until((workspace / "ready").exists, 20, "the command to start")
        client.cancel_generation(conv, "changed my mind")  # settles at once, as a cancel does
        with pytest.raises(GenerationCanceled):
            client.await_generation(conv, ref)
        changes = client.turn_changes(conv, ref)  # waits for the restore
        assert changes.workspace == "restored" and set(changes.paths) == {"keep.txt", "gone.txt", "made/d/f", "ready"}
        assert _settled(client, conv)["workspace"] == "restored"
    _as_it_was(workspace)


@pytest.mark.parametrize(("command", "options", "says"), [
    (["sh", "-c", "echo CHANGED > keep.txt; mkdir made; exec sleep 60"], {"timeout_ms": 1_000}, "timeout"),
    (["sh", "-c", "echo CHANGED > keep.txt; rm gone.txt; kill -9 $PPID"], {}, "generation worker crashed"),  # $PPID: the worker
], ids=["deadline", "crashed_worker"])
def test_a_run_past_its_deadline_or_whose_worker_crashed_is_undone(shared_daemon, conv, workspace, command, options, says):
    with shared_daemon.client() as client:
        _start(client, conv, workspace)
        script = [_tool("run_command", argv=command), {"text": "no"}]
        ref = client.generate_assistant_reply(conv, backend_opts={"script": script}, **options)
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        assert says in (raised.value.category, raised.value.message)
        assert raised.value.details["workspace"] == "restored"
        assert _settled(client, conv)["workspace"] == "restored"
    _as_it_was(workspace)


def test_a_completed_run_keeps_its_changes(connect, conv, workspace):
    with connect() as client:
        _start(client, conv, workspace)
        _, result = client.send_and_generate(conv, "go", generation_opts={"backend_opts": {"script": [*EDITS, {"text": "done"}]}})
        assert result.text == "done"
        assert not [e for e in client.conversation_thread_entries(conv) if e.event == "workspace_restored"]
    assert (workspace / "keep.txt").read_text() == "CHANGED\n"
    assert (workspace / "new" / "deep" / "file.txt").exists() and not (workspace / "gone.txt").exists()


def test_a_run_that_changes_nothing_takes_no_snapshot(connect, conv, workspace):
    with connect() as client:
        _start(client, conv, workspace)
        ref = client.generate_assistant_reply(conv, backend_opts={"script": [_tool("read_file", path="keep.txt")]})
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        assert raised.value.details["workspace"] == "unchanged"
        _, result = client.send_and_generate(conv, "again")  # the next run: nothing to wait for
        assert result.changes.workspace == "unchanged" and result.changes.files == []
        assert not [e for e in client.conversation_thread_entries(conv) if e.event == "workspace_restored"]
    _as_it_was(workspace)


def test_the_changes_of_a_run_a_killed_daemon_left_are_undone_at_restart(daemon, conv, workspace):
    command = ["sh", "-c", "echo CHANGED > keep.txt; rm gone.txt; mkdir made; touch ready; exec sleep 60"]
    with daemon.client() as client:
        _start(client, conv, workspace)
        ref = client.generate_assistant_reply(conv, backend_opts={"script": [_tool("run_command", argv=command), {"text": "no"}]})
        wait_until((workspace / "ready").exists, 20, "the command to start")
    family = daemon.descendants()
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(timeout=30)
    assert not wait_for_exit([p.pid for p in family], timeout_s=15)
    assert (workspace / "keep.txt").read_text() == "CHANGED\n"  # nobody undid it yet
    daemon.start()
    with daemon.client() as client:
        note = _settled(client, conv)
        assert note["workspace"] == "restored"
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
    assert raised.value.details == {"reason": "daemon_restarted", "workspace": "restored"}
    _as_it_was(workspace)


def test_a_run_canceled_by_a_daemon_shutdown_is_undone_before_the_daemon_exits(daemon, conv, workspace):
    script = [_tool("write_file", path="keep.txt", content="CHANGED\n"), {"text": "never", "delay_ms": 60_000}]
    with daemon.client() as client:
        _start(client, conv, workspace)
        client.generate_assistant_reply(conv, backend_opts={"script": script})
        wait_until(lambda: (workspace / "keep.txt").read_text() == "CHANGED\n", 20, "the run's change")
    assert daemon.stop() == 0  # SIGTERM: runs are canceled with reason daemon_shutdown
    _as_it_was(workspace)
    daemon.start()
    with daemon.client() as client:
        note = _settled(client, conv)
        finished = [e.data for e in client.conversation_thread_entries(conv) if e.event == "run_finished"]
    assert note["workspace"] == "restored" and finished[-1]["reason"] == "daemon_shutdown"
