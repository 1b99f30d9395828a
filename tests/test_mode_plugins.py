"""A mode from another distribution registers through the `genvisor.modes` entry-point
group and runs in the daemon's workers like the built-in ones: it implements the run
protocol (`modes.protocol`) with a graph of its own."""

from __future__ import annotations

import textwrap

from conftest import Daemon

PLUGIN = '''
import msgspec

from genvisor.modes.assemble import build_run_spec
from genvisor.modes.llm import RunSucceeded
from genvisor.modes.protocol import CallLLM, Commit, Fail, LLMFailed, LLMReplied, Start, Transitions
from genvisor.types import ContextMessage, LLMResult, ModeInfo


class ShoutingRun:
    """One LLM call, no tools, and the reply committed in capitals: a graph of its own."""

    def __init__(self, spec):
        self.spec = spec
        self._steps = Transitions({"ready": (Start,), "asking": (LLMReplied, LLMFailed), "done": ()}, "ready")

    def feed(self, event):
        self._steps.enter(event)
        if isinstance(event, Start):
            if self.spec.request is None:
                self._steps.step = "done"
                return Fail(self.spec.error)
            self._steps.step = "asking"
            return CallLLM(self.spec.request, 0)
        self._steps.step = "done"
        if isinstance(event, LLMFailed):
            return Fail(event.error)
        text = event.reply.text.upper() + "!"
        result = LLMResult(request_id=self.spec.request_id, conversation_id=self.spec.conversation_id,
                           backend=self.spec.request.backend.name, text=text)
        return Commit(RunSucceeded(result=result, messages=[ContextMessage("assistant", text, {"run_id": self.spec.run_id})]))


class ShoutingMode:
    info = ModeInfo(
        id="shouting", summary="one model call, the reply in capitals", capabilities=["llm"],
        required_options=[], optional_options=[], defaults={}, stability="experimental", version="0.1",
    )

    def validate(self, mode_state):
        return []

    def assemble(self, request):
        return build_run_spec(request, tools=frozenset())

    def new_run(self, spec):
        return ShoutingRun(spec)


MODE = ShoutingMode()
'''


def test_an_entry_point_mode_is_listed_configurable_and_runs(tmp_path):
    site = tmp_path / "site"
    dist = site / "shouting_mode-0.1.dist-info"
    dist.mkdir(parents=True)
    (site / "shouting_mode.py").write_text(textwrap.dedent(PLUGIN))
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shouting-mode\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[genvisor.modes]\nshouting = shouting_mode:MODE\n")
    daemon = Daemon(tmp_path, env={"PYTHONPATH": str(site)}).start()
    try:
        with daemon.client() as client:
            assert [m.id for m in client.supported_modes()] == ["coding", "planning", "shouting"]
            state = client.configure_mode("c", "shouting", reason="louder").state
            assert state.mode == "shouting"
            entry = client.conversation_thread_entries("c")[-1]
            assert (entry.event, entry.data["from"], entry.data["reason"]) == ("mode_switch_accepted", "coding", "louder")
            _, result = client.send_and_generate("c", "hello")
            assert result.text == "HELLO!"
            assert client.derived_state("c").run_history[0].mode == "shouting"
            assert {(t.event, t.mode) for t in client.telemetry()} == {("run_started", "shouting"), ("run_finished", "shouting")}
    finally:
        assert daemon.stop() == 0
