"""What a node's agent sends the daemon is hostile like any other input: whatever bytes
arrive as a run's outcome or cleanup record, the run ends once with a typed outcome
and a cleanup record, and the daemon's executor raises nothing. (The agent side
refuses frames it cannot decode the same way; the cluster itself is tested in
test_ray_executor.)"""

from __future__ import annotations

import msgspec
from hypothesis import given, settings, strategies as st

from genvisor.ipc.node import CallAnswered, NodeInfo, RunCleanedUp, RunProgress, RunSettled
from genvisor.supervisor.cluster import RayExecutor, _Node, _RemoteRun
from genvisor.supervisor.node_agent import AgentSettings
from genvisor.supervisor.ray_bridge import BridgeSettings
from genvisor.supervisor.runs import Broken, CleanupReport, Completed, Crashed, RunHandle

_encoder = msgspec.msgpack.Encoder()
AGENT = AgentSettings(node="", host="", daemon_key="", target="x:Y", calls="x:Z")


def _executor() -> RayExecutor:
    return RayExecutor(BridgeSettings(address="auto", namespace="test", agent=AGENT))


def _node() -> _Node:
    return _Node(NodeInfo(node="n1", host="10.0.0.1", agent="tcp://10.0.0.1:1", agent_key=""), sock=None, heard_at=0.0)  # type: ignore[arg-type]


values = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text() | st.binary(),
                      lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner), max_leaves=8)
# Shaped like the outcomes and the record, with whatever fields: what gets past a first look.
tagged = st.builds(lambda tag, fields: {**fields, "type": tag},
                   st.sampled_from(["Completed", "Crashed", "DeadlineExceeded", "Canceled", "Unavailable", "Broken", "Other"]),
                   st.dictionaries(st.sampled_from(["outcome", "details", "reason", "message", "category", "pid", "ended_by",
                                                    "reaped_after_ms", "leftovers_killed", "verified", "node"]), values))
payloads = st.binary() | values.map(_encoder.encode) | tagged.map(_encoder.encode)


@settings(max_examples=300, deadline=None)
@given(outcome=payloads, cleanup=payloads, event=payloads)
async def test_any_outcome_and_cleanup_bytes_end_the_run_once_with_a_typed_outcome(outcome, cleanup, event):
    executor, node = _executor(), _node()
    handle = RunHandle(1)
    seen = []
    node.runs[1] = remote = _RemoteRun(handle, seen.append)
    executor._on_agent_frame(node, RunProgress(run=1, event=msgspec.Raw(event)))
    executor._on_agent_frame(node, RunSettled(run=1, outcome=msgspec.Raw(outcome)))
    first = handle.outcome
    assert first is not None  # some outcome, typed: Broken if it did not decode
    executor._on_agent_frame(node, RunSettled(run=1, outcome=msgspec.Raw(_encoder.encode(Completed(msgspec.Raw(b"\xc0"))))))
    assert handle.outcome is first  # exactly one outcome: the first
    executor._on_agent_frame(node, RunProgress(run=1, event=msgspec.Raw(event)))  # after the outcome: dropped
    executor._on_agent_frame(node, RunCleanedUp(run=1, cleanup=msgspec.Raw(cleanup)))
    assert handle.settled.is_set() and remote.cleaned.is_set()
    assert len(seen) == 1  # the event before the outcome is relayed as it is (the daemon checks it)
    if isinstance(first, Crashed):
        assert first.details["node"] == "n1"  # which node it crashed on
    assert isinstance(remote.cleanup, CleanupReport) and remote.cleanup.node == "n1"


async def test_an_outcome_that_does_not_decode_is_broken_and_frames_of_unknown_runs_are_ignored():
    executor, node = _executor(), _node()
    handle = RunHandle(1)
    node.runs[1] = _RemoteRun(handle, lambda raw: None)
    executor._on_agent_frame(node, RunSettled(run=1, outcome=msgspec.Raw(b"\x81\xa3tag\xa4Nope")))
    assert isinstance(handle.outcome, Broken) and "n1" in handle.outcome.message
    executor._on_agent_frame(node, RunSettled(run=2, outcome=msgspec.Raw(b"\xc0")))  # no such run: nothing happens
    executor._on_agent_frame(node, CallAnswered(call=7, result=msgspec.Raw(b"\xc0")))  # no such call either
    assert list(node.runs) == [1]
