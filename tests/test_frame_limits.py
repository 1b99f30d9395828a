"""Frame size limits: up to MAX_FRAME_BYTES a frame is decoded, above it the answer is
BadRequest (with the request's id), above HARD_MAX_FRAME_BYTES ZeroMQ drops the peer
unread; the daemon serves on either way."""

from __future__ import annotations

import zmq

from genvisor.errors import BadRequest, NotFound
from genvisor.ipc import codec, frames
from raw_peer import RawPeer

LOC = frames.Locator(None, "no-such-conversation")


def _cancel_frame_of_size(size: int, request_id: int) -> bytes:
    """A CancelGeneration frame exactly `size` bytes long (its reason pads it): the
    conversation does not exist, so a decoded one is answered NotFound, changing nothing."""
    overhead = len(codec.encode_request(request_id, frames.CancelGeneration(LOC, "x" * 70_000))) - 70_000
    data = codec.encode_request(request_id, frames.CancelGeneration(LOC, "x" * (size - overhead)))
    assert len(data) == size
    return data


def test_a_frame_at_the_limit_is_decoded_and_one_byte_over_is_bad_request_with_its_id(shared_daemon):
    with RawPeer(shared_daemon.endpoint) as peer:
        peer.send(_cancel_frame_of_size(frames.MAX_FRAME_BYTES, 11))
        answer = peer.answer()
        assert isinstance(answer, frames.Failure) and answer.id == 11
        assert isinstance(answer.error.to_exception(), NotFound)

        peer.send(_cancel_frame_of_size(frames.MAX_FRAME_BYTES + 1, 12))
        answer = peer.answer()
        assert isinstance(answer, frames.Failure) and answer.id == 12
        assert isinstance(answer.error.to_exception(), BadRequest)
        assert "exceeds" in answer.error.message


def test_a_frame_over_the_hard_limit_drops_the_peer_and_the_daemon_keeps_serving(shared_daemon):
    with RawPeer(shared_daemon.endpoint, zmq.EVENT_DISCONNECTED) as peer:
        peer.send(b"\x00" * (frames.HARD_MAX_FRAME_BYTES + 1))
        peer.wait_for_event(zmq.EVENT_DISCONNECTED)
        # ZeroMQ reconnects the dropped peer; it is served like anyone else.
        peer.send(codec.encode_request(13, frames.Ping()))
        answer = peer.answer()
        assert isinstance(answer, frames.Reply) and answer.id == 13
    with shared_daemon.client() as client:
        assert client.ping().pid == shared_daemon.pid
