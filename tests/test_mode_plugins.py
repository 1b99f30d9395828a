"""A mode from another distribution registers through the `genvisor.modes` entry-point
group and runs in the daemon's workers like `coding`."""

from __future__ import annotations

import textwrap

from conftest import Daemon

PLUGIN = '''
from genvisor.modes.coding import CodingRun
from genvisor.types import ModeInfo


class ShoutingMode:
    info = ModeInfo(
        id="shouting", summary="coding, but the system prompt says to shout", capabilities=["llm"],
        required_options=[], optional_options=[], defaults={}, stability="experimental", version="0.1",
    )

    def validate(self, mode_state):
        return []

    def new_run(self, spec):
        return CodingRun(spec)


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
            assert [m.id for m in client.supported_modes()] == ["coding", "shouting"]
            state = client.configure_mode("c", "shouting", reason="louder").state
            assert state.mode == "shouting"
            entry = client.conversation_thread_entries("c")[-1]
            assert (entry.event, entry.data["from"], entry.data["reason"]) == ("mode_switch_accepted", "coding", "louder")
            _, result = client.send_and_generate("c", "hello")
            assert result.text == "hello"
            assert client.derived_state("c").run_history[0].mode == "shouting"
            assert {(t.event, t.mode) for t in client.telemetry()} == {("run_started", "shouting"), ("run_finished", "shouting")}
    finally:
        assert daemon.stop() == 0
