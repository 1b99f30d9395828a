"""A run paused for approvals: what it waits for, the answers so far, and how it is
journaled so that it survives a restart.

A run whose next tool calls need approval ends its worker with `RunPaused`: what it
was fed so far, the batch of calls, which of them ask. The daemon keeps that (and the
run's spec) as a `Pause`, journaled whole at each change; on the last answer a fresh
worker replays what the run was fed and goes on from that batch (`Resume`).
"""

from __future__ import annotations

import time

import msgspec

from genvisor.modes.llm import Decision, Fed, Resume, RunPaused, RunSpec
from genvisor.types import ApprovalRequest, ToolCall


class StoredPause(msgspec.Struct, frozen=True):
    spec: RunSpec
    fed: bytes  # msgpack of list[Fed]
    calls: list[ToolCall]
    asks: list[str]
    decisions: dict[str, Decision]
    snapshotted: bool
    requested_at: float  # Unix time: an approval's timeout outlives a restart
    ran_s: float  # how long the run's workers ran before: its deadline does not tick while paused


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(StoredPause)
_fed_decoder = msgspec.msgpack.Decoder(list[Fed])


class Pause:
    def __init__(self, fed: bytes, paused: RunPaused, *, requested_at: float | None = None,
                 decisions: dict[str, Decision] | None = None) -> None:
        # What the run was fed stays encoded (a tenth of its decoded size) until it goes on.
        self.fed = fed
        self.calls = paused.calls
        self.asks = paused.asks
        self.snapshotted = paused.snapshotted
        self.requested_at = time.time() if requested_at is None else requested_at
        self.decisions: dict[str, Decision] = decisions or {}

    def requests(self, ref: str) -> list[ApprovalRequest]:
        """The calls still waiting for an answer."""
        return [ApprovalRequest(ref, call.id, call.name, call.arguments, self.requested_at)
                for call in self.calls if call.id in self.asks and call.id not in self.decisions]

    def call(self, call_id: str) -> ToolCall | None:
        """The call `call_id` names, if it waits for an answer."""
        if call_id not in self.asks or call_id in self.decisions:
            return None
        return next(call for call in self.calls if call.id == call_id)

    @property
    def answered(self) -> bool:
        return all(call_id in self.decisions for call_id in self.asks)

    @classmethod
    def of(cls, paused: RunPaused) -> Pause:
        return cls(_encoder.encode(paused.fed), msgspec.structs.replace(paused, fed=[]))

    def resume(self, first_seq: int) -> Resume:
        return Resume(_fed_decoder.decode(self.fed), self.decisions, first_seq, self.snapshotted)

    def encode(self, spec: RunSpec, ran_s: float) -> bytes:
        return _encoder.encode(StoredPause(spec, self.fed, self.calls, self.asks, self.decisions, self.snapshotted,
                                           self.requested_at, ran_s))


def decode(data: bytes) -> tuple[Pause, RunSpec, float]:
    """A journaled pause: itself, the run's spec, and how long its workers ran."""
    stored = _decoder.decode(data)
    pause = Pause(stored.fed, RunPaused([], stored.calls, stored.asks, stored.snapshotted), requested_at=stored.requested_at,
                  decisions=dict(stored.decisions))
    return pause, stored.spec, stored.ran_s
