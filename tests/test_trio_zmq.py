"""The Trio⇄pyzmq adapter under concurrency: many senders, one receiver, both ways.

A naive edge-triggered adapter hangs here (a send consumes the fd edge and the parked
receiver never wakes); `trio.fail_after` turns such a hang into a failure.
"""

from __future__ import annotations

import trio
import zmq

from genvisor.ipc.trio_zmq import TrioSocket

SENDERS = 16
MESSAGES_PER_SENDER = 300


async def test_many_senders_one_receiver_both_directions_never_hang(tmp_path):
    ctx = zmq.Context()
    endpoint = f"ipc://{tmp_path}/stress.sock"
    router = ctx.socket(zmq.ROUTER)
    router.bind(endpoint)
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(endpoint)
    total = SENDERS * MESSAGES_PER_SENDER
    echoed: list[bytes] = []
    try:
        with trio.fail_after(60):
            async with TrioSocket.open(router) as server, TrioSocket.open(dealer) as client:

                async def echo_server() -> None:
                    # The server also sends from many tasks while its receiver waits.
                    async with trio.open_nursery() as replies:
                        for _ in range(total):
                            identity, payload = await server.recv_multipart()
                            replies.start_soon(server.send_multipart, [identity, payload])

                async def sender(index: int) -> None:
                    for n in range(MESSAGES_PER_SENDER):
                        await client.send_multipart([b"%d:%d" % (index, n)])

                async def receiver() -> None:
                    for _ in range(total):
                        (payload,) = await client.recv_multipart()
                        echoed.append(payload)

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(echo_server)
                    nursery.start_soon(receiver)
                    for index in range(SENDERS):
                        nursery.start_soon(sender, index)
    finally:
        ctx.term()

    assert len(echoed) == total
    assert set(echoed) == {b"%d:%d" % (i, n) for i in range(SENDERS) for n in range(MESSAGES_PER_SENDER)}


async def test_closing_wakes_a_parked_receiver(tmp_path):
    ctx = zmq.Context()
    pair = ctx.socket(zmq.DEALER)
    pair.bind(f"ipc://{tmp_path}/idle.sock")
    outcome: list[str] = []
    try:
        with trio.fail_after(10):
            async with TrioSocket.open(pair) as sock:

                async def park() -> None:
                    try:
                        await sock.recv_multipart()
                    except trio.ClosedResourceError:
                        outcome.append("closed")

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(park)
                    await trio.testing.wait_all_tasks_blocked()
                    sock.close()
    finally:
        ctx.term()
    assert outcome == ["closed"]
