"""What a client or a run does is contained to that request or that run: a bad option,
a turn too large for the worker channel, commands racing on one conversation — the
daemon answers with a typed error and goes on serving every other conversation."""

from __future__ import annotations

import math

import pytest

from genvisor.errors import GenerationInProgress, LLMError
from genvisor.ipc import codec
from genvisor.ipc.frames import Failure, Locator, Reply, SendAndGenerate, SendUserMessage
from raw_peer import RawPeer


def _still_serving(daemon_or_connect, conv: str) -> None:
    with daemon_or_connect() as client:
        _, result = client.send_and_generate(conv + "_bystander", "still there?")
        assert result.text == "still there?"


@pytest.mark.parametrize("option", [{"timeout_ms": "soon"}, {"timeout_ms": math.nan}, {"timeout_ms": [1, 2]},
                                    {"timeout_ms": True}, {"timeout_ms": 10**15}, {"stream": "yes"}], ids=str)
def test_a_bad_llm_option_fails_the_run_as_config_and_the_daemon_serves_on(connect, conv, option):
    with connect() as client:
        client.configure_llm(conv, options=option)
        client.send_user_message(conv, "hi")
        ref = client.generate_assistant_reply(conv)
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        assert raised.value.category == "config"
        assert next(iter(option)) in raised.value.message
        # The guard is down and history unchanged: a good option fixes the conversation.
        client.configure_llm(conv, options={next(iter(option)): {"timeout_ms": 5_000, "stream": False}[next(iter(option))]})
        _, result = client.send_and_generate(conv, "again")
        assert result.text == "again"
    _still_serving(connect, conv)


@pytest.mark.parametrize("option", [{"temperature": math.inf}, {"max_tokens": -1}, {"timeout_ms": 0}], ids=str)
def test_a_bad_generation_option_fails_the_run_as_config(connect, conv, option):
    with connect() as client:
        client.send_user_message(conv, "hi")
        ref = client.generate_assistant_reply(conv, **option)
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        assert raised.value.category == "config"


def test_a_journaled_bad_option_fails_runs_after_a_restart_too(daemon, conv):
    with daemon.client() as client:
        client.configure_llm(conv, options={"timeout_ms": "soon"})
        client.send_user_message(conv, "hi")
    assert daemon.stop() == 0
    daemon.start()
    with daemon.client() as client:
        ref = client.generate_assistant_reply(conv)
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        assert raised.value.category == "config"
    _still_serving(daemon.client, conv)


def test_a_context_over_the_worker_channel_limit_is_a_config_error_not_a_crash(shared_daemon, conv):
    big = "x" * (10 * 1024 * 1024)  # under the 16 MiB frame limit: each message is accepted
    with shared_daemon.client(timeout_ms=60_000) as client:
        for _ in range(7):
            client.record_assistant_message(conv, big)
        client.send_user_message(conv, "and now?")
        ref = client.generate_assistant_reply(conv)
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
    error = raised.value
    assert error.category == "config"
    assert error.details["reason"] == "context_too_large"
    assert "max_messages" in error.message
    with shared_daemon.client(timeout_ms=60_000) as client:
        _, result = client.send_and_generate(conv, "fewer", generation_opts={"max_messages": 1})
        assert result.text == "fewer"
    _still_serving(shared_daemon.client, conv)


def test_a_turn_whose_result_exceeds_the_channel_limit_fails_with_result_too_large(shared_daemon, conv, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "big.txt").write_text("y" * 300_000)
    calls = [{"name": "read_file", "arguments": {"path": "big.txt"}}] * 256
    with shared_daemon.client(timeout_ms=60_000) as client:
        client.start_conversation(conv, metadata={"workspace": str(workspace)})
        client.configure_mode(conv, "coding", {"max_tool_calls": 256})
        client.send_user_message(conv, "read it all")
        before = client.conversation_messages(conv)
        ref = client.generate_assistant_reply(conv, backend_opts={"script": [{"tool_calls": calls}, {"text": "done"}]})
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref, timeout_ms=60_000)
        assert raised.value.details["reason"] == "result_too_large"
        assert "result" in raised.value.message
        assert client.conversation_messages(conv) == before
    _still_serving(shared_daemon.client, conv)


def test_commands_to_one_conversation_take_effect_in_arrival_order(shared_daemon, conv):
    """SendAndGenerate then SendUserMessage, sent back to back without waiting: the
    generation's message is recorded first and its run is active, so the second
    message is refused — for every pair."""
    pairs = 40
    with RawPeer(shared_daemon.endpoint) as peer:
        for n in range(pairs):
            loc = Locator(None, f"{conv}_{n}")
            peer.send(codec.encode_request(2 * n + 1, SendAndGenerate(loc, "first", options={"backend_opts": {"delay_ms": 100}})))
            peer.send(codec.encode_request(2 * n + 2, SendUserMessage(loc, "second")))
        answers = {}
        while len(answers) < 2 * pairs:
            frame = peer.answer(timeout_s=60)
            if isinstance(frame, (Reply, Failure)):
                answers[frame.id] = frame
    for n in range(pairs):
        assert isinstance(answers[2 * n + 1], Reply), answers[2 * n + 1]
        second = answers[2 * n + 2]
        assert isinstance(second, Failure) and second.error.code == GenerationInProgress.code, second
    with shared_daemon.client() as client:
        assert [m.content for m in client.conversation_messages(f"{conv}_0")] == ["first", "first"]


def test_a_scripted_error_of_an_unknown_category_is_a_config_error(connect, conv):
    with connect() as client:
        client.send_user_message(conv, "hi")
        ref = client.generate_assistant_reply(conv, backend_opts={"error": {"category": "bogus", "message": "m"}})
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        assert raised.value.category == "config"
        assert "category" in raised.value.message


@pytest.mark.parametrize("target", ["undecodable_frame", "wrong_frame_type", "oversized_frame"])
def test_a_worker_that_breaks_the_run_protocol_ends_its_run_and_is_torn_down(target):
    """The supervisor's side of a hostile worker frame: one outcome (Broken), the
    worker killed and its cleanup verified, the supervisor itself unharmed."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).with_name("hostile_worker.py")
    done = subprocess.run([sys.executable, str(script), target], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Broken: "), done.stdout + done.stderr


def test_an_await_timeout_of_days_is_waited_for(shared_daemon, conv):
    """zmq's poll takes a C int of milliseconds: a longer wait is waited in slices."""
    with shared_daemon.client() as client:
        client.send_user_message(conv, "slow")
        ref = client.generate_assistant_reply(conv, backend_opts={"delay_ms": 200})
        assert client.await_generation(conv, ref, timeout_ms=2**40).text == "slow"
