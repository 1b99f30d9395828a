"""Real coding turns: the `openai` backend against a local server speaking the wire
format, and the workspace tools, through a real daemon and real workers."""

from __future__ import annotations

import json
import os
import socket

import pytest

from conftest import OPENAI_KEY_ENV, Daemon, find_tagged, openai_config, wait_for_group_gone, wait_for_marker
from genvisor.errors import GenerationCanceled, LLMError
from genvisor.types import GenerationEvent
from openai_server import FakeOpenAI, drop_mid_stream, error, hang, text, tool_calls

ALL_TOOLS = ["read_file", "list_dir", "search_text", "write_file", "edit_file", "run_command"]


@pytest.fixture(scope="module")
def fake():
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def daemon(fake, tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("openai"), openai_config(fake.base_url), env={OPENAI_KEY_ENV: "sk-test-key"}).start()
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture
def workspace(tmp_path):
    root = tmp_path / "ws"
    root.mkdir()
    (root / "hello.py").write_text('print("hello")\n')
    return root


def _start(client, conv, workspace, skills=ALL_TOOLS):
    client.start_conversation(conv, metadata={"workspace": str(workspace)})
    client.configure_skills(conv, skills)


def _call(name, **arguments):
    return (name, json.dumps(arguments))


def _tool_messages(request):
    return [m for m in request["messages"] if m["role"] == "tool"]


def test_a_turn_reads_edits_and_runs_then_commits_every_message(daemon, fake, conv, workspace):
    fake.requests.clear()
    fake.reply(tool_calls([_call("read_file", path="hello.py")]))
    fake.reply(tool_calls([_call("edit_file", path="hello.py", old='"hello"', new='"hello, world"')]))
    fake.reply(tool_calls([_call("run_command", argv=["python3", "hello.py"])]))
    fake.reply(text("Done: it prints hello, world.", usage=(40, 7)))
    with daemon.client() as client:
        _start(client, conv, workspace)
        _, result = client.send_and_generate(conv, "make it greet the world", generation_opts={"backend": "local"})
        messages = client.conversation_messages(conv)
    assert result.text == "Done: it prints hello, world." and result.backend == "local" and result.model == "test-model"
    assert (workspace / "hello.py").read_text() == 'print("hello, world")\n'
    assert [m.role for m in messages] == ["user", "assistant", "tool", "assistant", "tool", "assistant", "tool", "assistant"]
    assert [m.metadata.get("name") for m in messages if m.role == "tool"] == ["read_file", "edit_file", "run_command"]
    requests = fake.requests[-4:]
    assert {t["function"]["name"] for t in requests[0]["tools"]} == set(ALL_TOOLS)
    assert _tool_messages(requests[1])[-1]["content"] == 'print("hello")\n'
    assert "exit code 0" in _tool_messages(requests[3])[-1]["content"] and "hello, world" in _tool_messages(requests[3])[-1]["content"]
    assert fake.headers[-1]["authorization"] == "Bearer sk-test-key"
    assert result.usage.total_tokens >= 47


def test_streamed_deltas_and_usage(daemon, fake, conv, workspace):
    fake.reply(text("Hello there, coder", chunks=["Hel", "lo there", ", coder"], usage=(5, 3)))
    events: list[GenerationEvent] = []
    with daemon.client() as client:
        _start(client, conv, workspace)
        _, result = client.send_and_generate(conv, "hi", generation_opts={"backend": "local", "stream": True}, on_event=events.append)
    assert "".join(e.text for e in events if e.kind == "delta") == "Hello there, coder"
    assert result.text == "Hello there, coder" and result.usage.total_tokens == 8
    assert fake.requests[-1]["stream"] is True


def test_streamed_tool_calls_are_assembled(daemon, fake, conv, workspace):
    fake.reply(tool_calls([_call("write_file", path="notes/todo.txt", content="a longer piece of text, split in chunks")]))
    fake.reply(text("written"))
    with daemon.client() as client:
        _start(client, conv, workspace)
        _, result = client.send_and_generate(conv, "note it", generation_opts={"backend": "local", "stream": True})
    assert result.text == "written"
    assert (workspace / "notes" / "todo.txt").read_text() == "a longer piece of text, split in chunks"


@pytest.mark.parametrize(
    ("response", "category", "retryable", "details"),
    [
        (error(401, code="invalid_api_key"), "auth", False, {"status": 401, "code": "invalid_api_key"}),
        (error(403), "auth", False, {"status": 403}),
        (error(429, code="rate_limit_exceeded"), "provider", True, {"status": 429, "code": "rate_limit_exceeded"}),
        (error(503), "provider", True, {"status": 503}),
        (error(400, code="context_length_exceeded"), "provider", False, {"status": 400, "code": "context_length_exceeded"}),
        (drop_mid_stream(), "transport", True, {}),
    ],
    ids=["401", "403", "429", "503", "400", "dropped_stream"],
)
def test_error_mapping_leaves_history_unchanged(daemon, fake, conv, workspace, response, category, retryable, details):
    fake.reply(response)
    with daemon.client() as client:
        _start(client, conv, workspace)
        with pytest.raises(LLMError) as raised:
            client.send_and_generate(conv, "hi", generation_opts={"backend": "local", "stream": True})
        assert [m.role for m in client.conversation_messages(conv)] == ["user"]
    assert (raised.value.category, raised.value.retryable) == (category, retryable)
    assert details.items() <= raised.value.details.items()


def test_a_server_that_never_answers_is_a_timeout(daemon, fake, conv, workspace):
    fake.reply(hang())
    with daemon.client() as client:
        _start(client, conv, workspace)
        with pytest.raises(LLMError) as raised:
            client.send_and_generate(conv, "hi", generation_opts={"backend": "local", "timeout_ms": 300})
    assert raised.value.category == "timeout" and raised.value.retryable


def test_connection_refused_is_transport(tmp_path, conv):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again before the daemon connects: refused
    daemon = Daemon(tmp_path, openai_config(f"http://127.0.0.1:{port}/v1"), env={OPENAI_KEY_ENV: "k"}).start()
    try:
        with daemon.client() as client:
            with pytest.raises(LLMError) as raised:
                client.send_and_generate(conv, "hi", generation_opts={"backend": "local"})
        assert raised.value.category == "transport"
    finally:
        assert daemon.stop() == 0


def test_a_missing_api_key_is_an_auth_error(tmp_path, fake, conv):
    daemon = Daemon(tmp_path, openai_config(fake.base_url), env={OPENAI_KEY_ENV: ""}).start()
    try:
        with daemon.client() as client:
            with pytest.raises(LLMError) as raised:
                client.send_and_generate(conv, "hi", generation_opts={"backend": "local"})
        assert raised.value.category == "auth" and OPENAI_KEY_ENV in raised.value.message
    finally:
        assert daemon.stop() == 0


def test_cancel_during_a_stream(daemon, fake, conv, workspace):
    fake.hanging.clear()
    fake.reply(hang(["partial "]))
    with daemon.client() as client:
        _start(client, conv, workspace)
        client.send_user_message(conv, "hi")
        ref = client.generate_assistant_reply(conv, backend="local", stream=True)
        assert fake.hanging.wait(10)
        client.cancel_generation(conv, reason="stop_streaming")
        with pytest.raises(GenerationCanceled):
            client.await_generation(conv, ref)
        assert [m.role for m in client.conversation_messages(conv)] == ["user"]


def test_cancel_during_a_running_command_kills_it(daemon, fake, conv, workspace):
    fifo = workspace / "up.fifo"
    os.mkfifo(fifo)
    tag = "424242"
    fake.reply(tool_calls([_call("run_command", argv=["sh", "-c", f"echo up > {fifo}; exec sleep {tag}"])]))
    with daemon.client() as client:
        _start(client, conv, workspace)
        client.send_user_message(conv, "run it")
        ref = client.generate_assistant_reply(conv, backend="local")
        wait_for_marker(fifo)
        command = find_tagged(tag)
        pgid = os.getpgid(command.pid)
        client.cancel_generation(conv)
        wait_for_group_gone(pgid, timeout_s=15)
        assert find_tagged(tag) is None
        with pytest.raises(GenerationCanceled):
            client.await_generation(conv, ref)
        # Nothing of the run was committed: no tool call, no tool result.
        assert [m.role for m in client.conversation_messages(conv)] == ["user"]


def test_a_failed_run_commits_none_of_its_tool_messages(daemon, fake, conv, workspace):
    fake.reply(tool_calls([_call("list_dir")]))
    fake.reply(error(500))
    with daemon.client() as client:
        _start(client, conv, workspace)
        with pytest.raises(LLMError):
            client.send_and_generate(conv, "look around", generation_opts={"backend": "local"})
        assert [m.role for m in client.conversation_messages(conv)] == ["user"]


ESCAPES = [
    _call("read_file", path="../secret.txt"),
    _call("read_file", path="/etc/passwd"),
    _call("read_file", path="link-out/secret.txt"),
    _call("write_file", path="../../evil.txt", content="x"),
    _call("list_dir", path=".."),
    _call("run_command", argv=["true"]),  # not enabled by the default skills
    _call("edit_file", path="hello.py", old="nothing like this", new="x"),
    _call("read_file", path="hello.py", extra=1),
    ("no_such_tool", "{}"),
]


def test_workspace_escapes_and_bad_calls_are_tool_errors_the_model_sees(daemon, fake, conv, workspace, tmp_path):
    (tmp_path / "secret.txt").write_text("top secret")
    (workspace / "link-out").symlink_to(tmp_path)
    fake.reply(tool_calls(ESCAPES))
    fake.reply(text("I could not."))
    with daemon.client() as client:
        client.start_conversation(conv, metadata={"workspace": str(workspace)})  # default skills: no run_command
        _, result = client.send_and_generate(conv, "try to escape", generation_opts={"backend": "local"})
    assert result.text == "I could not."
    results = [m["content"] for m in _tool_messages(fake.requests[-1])]
    assert len(results) == len(ESCAPES)
    assert all("top secret" not in r for r in results)
    assert "outside the workspace" in results[0] and "absolute" in results[1] and "outside the workspace" in results[2]
    assert "outside the workspace" in results[3] and "outside the workspace" in results[4]
    assert "not enabled" in results[5] and "not found" in results[6] and "unknown arguments" in results[7]
    assert "unknown tool" in results[8]
    assert not (tmp_path.parent / "evil.txt").exists()


def test_the_scripted_backend_drives_the_same_tool_paths_offline(daemon, conv, workspace):
    script = [
        {"tool_calls": [{"name": "write_file", "arguments": {"path": "out.txt", "content": "offline"}}]},
        {"tool_calls": [{"name": "edit_file", "arguments": {"path": "out.txt", "old": "off", "new": "on"}}]},
        {"text": "ok"},
    ]
    with daemon.client() as client:
        _start(client, conv, workspace)
        _, result = client.send_and_generate(conv, "go", generation_opts={"backend_opts": {"script": script}})
        roles = [m.role for m in client.conversation_messages(conv)]
    assert result.text == "ok" and (workspace / "out.txt").read_text() == "online"
    assert roles == ["user", "assistant", "tool", "assistant", "tool", "assistant"]
