"""A run that does not complete keeps what it streamed — its text and its tool trace — in
its outcome (`details["partial_text"]`) and in the journal as a `partial_output` note,
never as a message: the history does not change. Both executors."""

from __future__ import annotations

import pytest

from conftest import wait_until
from genvisor.errors import GenerationCanceled, LLMError
from genvisor.types import GenerationEvent


def _partial_notes(client, conv) -> list[dict]:
    return [e.data for e in client.conversation_thread_entries(conv) if e.event == "partial_output"]


def test_a_failed_run_keeps_its_text_and_tool_trace_but_commits_nothing(connect, conv, tmp_path):
    script = [{"text": "Looking at it. ", "tool_calls": [{"name": "read_file", "arguments": {"path": "missing.txt"}}]},
              {"error": {"category": "provider", "message": "upstream went away"}}]
    with connect() as client:
        client.start_conversation(conv, metadata={"workspace": str(tmp_path)})
        client.send_user_message(conv, "look")
        ref = client.generate_assistant_reply(conv, backend_opts={"script": script})
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        assert raised.value.details["partial_text"] == "Looking at it. "
        [note] = _partial_notes(client, conv)
        assert note["ref"] == ref and note["text"] == "Looking at it. " and not note["truncated"]
        assert [(t["name"], t["is_error"]) for t in note["tool_trace"]] == [("read_file", True)]
        assert [m.role for m in client.conversation_messages(conv)] == ["user"]


def test_a_canceled_stream_keeps_what_it_had_streamed(connect, conv):
    chunks = [f"part{i} " for i in range(200)]
    with connect() as client:
        client.send_user_message(conv, "write a lot")
        ref = client.generate_assistant_reply(conv, events=True, backend_opts={"chunks": chunks, "chunk_delay_ms": 20})
        seen: list[str] = []

        def three_deltas() -> bool:
            note = client.next_notification(timeout_ms=100)
            if isinstance(note, GenerationEvent) and note.kind == "delta":
                seen.append(note.text)
            return len(seen) >= 3

        wait_until(three_deltas, 30, "three deltas")
        client.cancel_generation(conv, "enough")
        with pytest.raises(GenerationCanceled):
            client.await_generation(conv, ref)
        [note] = _partial_notes(client, conv)
    assert note["text"].startswith("".join(seen)) and "".join(chunks).startswith(note["text"])
    assert len(note["text"]) < len("".join(chunks))


def test_a_run_past_its_deadline_keeps_what_it_had_streamed(connect, conv):
    chunks = [f"word{i} " for i in range(200)]
    with connect() as client:
        client.send_user_message(conv, "slowly")
        ref = client.generate_assistant_reply(conv, timeout_ms=500, backend_opts={"chunks": chunks, "chunk_delay_ms": 20})
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        assert raised.value.category == "timeout"
        partial = raised.value.details["partial_text"]
        assert partial and "".join(chunks).startswith(partial) and _partial_notes(client, conv)[0]["text"] == partial


def test_a_run_that_streamed_nothing_leaves_no_partial_note(connect, conv):
    with connect() as client:
        client.send_user_message(conv, "fail at once")
        ref = client.generate_assistant_reply(conv, backend_opts={"error": {"category": "auth", "message": "no key"}})
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        assert "partial_text" not in raised.value.details and _partial_notes(client, conv) == []
