"""Frames of the supervision plane: daemon ⇄ zygote (control) and daemon ⇄ worker (run).

They know nothing of conversations: a run spec, its progress events and its outcome
travel as opaque msgpack (`msgspec.Raw`) that only the mode runtime decodes.
"""

from __future__ import annotations

import msgspec

# ---- daemon ⇄ zygote, one frame per SOCK_SEQPACKET datagram --------------------------


class Spawn(msgspec.Struct, frozen=True, tag=True):
    """Fork a worker; its run channel arrives as the one SCM_RIGHTS fd of this frame."""

    token: int


class ZygoteHello(msgspec.Struct, frozen=True, tag=True):
    pid: int


class Spawned(msgspec.Struct, frozen=True, tag=True):
    token: int
    pid: int


class SpawnFailed(msgspec.Struct, frozen=True, tag=True):
    token: int
    error: str


class Exited(msgspec.Struct, frozen=True, tag=True):
    """A child of the zygote was reaped; `status` is the raw wait status."""

    pid: int
    status: int


ToZygote = Spawn
FromZygote = ZygoteHello | Spawned | SpawnFailed | Exited

# ---- daemon ⇄ worker, length-prefixed frames on the run channel ----------------------


class Start(msgspec.Struct, frozen=True, tag=True):
    spec: msgspec.Raw


class Stop(msgspec.Struct, frozen=True, tag=True):
    """Graceful cancel: the worker cancels its run and exits."""

    reason: str


class Ready(msgspec.Struct, frozen=True, tag=True):
    pid: int


class Progress(msgspec.Struct, frozen=True, tag=True):
    event: msgspec.Raw


class Finished(msgspec.Struct, frozen=True, tag=True):
    outcome: msgspec.Raw


ToWorker = Start | Stop
FromWorker = Ready | Progress | Finished
