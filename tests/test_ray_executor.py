"""The Ray executor (`[executor] kind = "ray"`): runs go to a Ray cluster's nodes, each
in a fresh worker of the node's agent, behind the same contract. The contract and
parity tests run on it through the `connect` fixture; these are what only a cluster
has: which node a run is on, its processes killed there, a node lost mid-run, a
cluster that goes away and comes back, runs by node in `status` and /metrics, and a
workspace's runs (and their undoing) on the node that holds it.

The clusters are real (Ray's cluster_utils: a GCS and a raylet per node, on this
machine); so are the daemons, agents and workers."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import urllib.request

import msgspec
import psutil
import pytest

from conftest import RayDaemon, find_tagged, marked_processes, spawn_marker, wait_for_group_gone, wait_for_marker, wait_until
from genvisor.errors import GenerationCanceled, LLMError


def raylets(cluster) -> dict[int, str]:
    """Each node's raylet pid → the node's id."""
    return {node.all_processes["raylet"][0].process.pid: node.node_id for node in cluster.list_all_nodes()}


def node_of_process(pid: int, cluster) -> str:
    """The node whose raylet the process `pid` descends from (actor → agent → zygote → worker → …)."""
    known = raylets(cluster)
    for ancestor in psutil.Process(pid).parents():
        if ancestor.pid in known:
            return known[ancestor.pid]
    raise AssertionError(f"process {pid} is not below any node's raylet")


def start_tool_run(client, conv: str, tmp_path) -> tuple[str, psutil.Process]:
    """A run whose worker has started a tool process and then waits a minute: its ref, and the tool."""
    argv, fifo, tag = spawn_marker(tmp_path, conv)
    client.send_user_message(conv, "hi")
    ref = client.generate_assistant_reply(conv, backend_opts={"spawn": argv, "delay_ms": 60_000})
    wait_for_marker(fifo)
    return ref, find_tagged(tag)


def gone(process: psutil.Process) -> bool:
    """Exited: a zombie counts (its reaper, a subreaper above it, collects it in its own time)."""
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def finished_lines(daemon: RayDaemon, ref: str) -> list[str]:
    return [line for line in daemon.log().splitlines() if "run.finished" in line and f"ref={ref}" in line]


def field(line: str, name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", line)
    assert match, f"no {name}= in {line}"
    return match.group(1)


def test_a_run_goes_to_a_node_and_its_cleanup_record_names_it(ray_daemon, conv):
    with ray_daemon.client() as client:
        client.send_user_message(conv, "hi")
        ref = client.generate_assistant_reply(conv)
        assert client.await_generation(conv, ref).text == "hi"
        status = client.status()
    assert status.executor == "ray" and status.cluster == "up"
    line = wait_until(lambda: finished_lines(ray_daemon, ref), 10, "the run's run.finished line")[0]
    assert field(line, "node") in {n.node for n in status.nodes}
    assert field(line, "cleanup") == "verified"


def test_cancel_kills_and_verifies_the_runs_whole_tree_on_its_node(ray_daemon, ray_cluster, conv, tmp_path):
    with ray_daemon.client() as client:
        ref, tool = start_tool_run(client, conv, tmp_path)
        worker = os.getpgid(tool.pid)
        node = node_of_process(tool.pid, ray_cluster)
        assert ray_daemon.pid not in [p.pid for p in tool.parents()]  # it runs on the node, not under the daemon
        before = client.status().cancel_reaped.count
        client.cancel_generation(conv)
        with pytest.raises(GenerationCanceled):
            client.await_generation(conv, ref)
        wait_for_group_gone(worker, timeout_s=15)
        assert gone(tool)
        wait_until(lambda: client.status().cancel_reaped.count == before + 1, 10, "the cancel's cleanup observed")
    line = wait_until(lambda: finished_lines(ray_daemon, ref), 10, "the run's run.finished line")[0]
    assert field(line, "node") == node and field(line, "cleanup") == "verified"
    assert field(line, "outcome") == "canceled"
    assert 0 < float(field(line, "reaped_ms")) < 15_000  # timed on the daemon's clock, cancel → the node's record


def test_a_deadline_kills_a_hung_run_on_its_node(ray_daemon, ray_cluster, conv, tmp_path):
    argv, fifo, tag = spawn_marker(tmp_path, conv)
    with ray_daemon.client() as client:
        client.send_user_message(conv, "hi")
        ref = client.generate_assistant_reply(conv, timeout_ms=1_000, backend_opts={"spawn": argv, "crash": "hang"})
        wait_for_marker(fifo)
        tool = find_tagged(tag)
        worker = os.getpgid(tool.pid)
        node_of_process(tool.pid, ray_cluster)  # on a node
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
    assert raised.value.category == "timeout"
    wait_for_group_gone(worker, timeout_s=15)
    assert gone(tool)
    line = wait_until(lambda: finished_lines(ray_daemon, ref), 10, "the run's run.finished line")[0]
    assert field(line, "ended_by") == "sigkill" and field(line, "cleanup") == "verified"


def test_a_worker_crash_on_a_node_says_which_node(ray_daemon, conv):
    with ray_daemon.client() as client:
        client.send_user_message(conv, "hi")
        ref = client.generate_assistant_reply(conv, backend_opts={"crash": "signal"})
        with pytest.raises(LLMError) as raised:
            client.await_generation(conv, ref)
        nodes = {n.node for n in client.status().nodes}
    assert raised.value.category == "unknown"
    assert raised.value.details["signal_name"] == "SIGKILL"
    assert raised.value.details["node"] in nodes


def test_status_and_metrics_show_runs_by_node(ray_cluster, tmp_path, conv):
    metrics_port = _free_port()
    config = f'metrics = "127.0.0.1:{metrics_port}"\n'
    from conftest import TEST_CONFIG

    daemon = RayDaemon(tmp_path / "d", ray_cluster.address, config=config + TEST_CONFIG).start()
    try:
        nodes = daemon.wait_for_nodes(2)
        with daemon.client() as client:
            for i in range(4):  # one conversation each: spread over the nodes, least loaded first
                client.send_and_generate(f"{conv}_{i}", "hi")
            status = client.status()
        assert sum(n.runs_started for n in status.nodes) == 4
        assert all(n.runs_started >= 1 for n in status.nodes)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
        for node in nodes:
            started = re.search(rf'genvisor_node_runs_started_total{{host="[^"]+",node="{node.node}"}} (\S+)', text)
            assert started, text
        assert float(re.search(r"^genvisor_nodes_lost_total (\S+)$", text, re.M).group(1)) == 0
        shown = subprocess.run([sys.executable, "-m", "genvisor", "--endpoint", daemon.endpoint, "status"],
                               capture_output=True, text=True, timeout=30, check=True).stdout
        assert "cluster  ray, up, 2 nodes, 0 lost" in shown
        for node in status.nodes:
            assert f"node {node.node[:8]}" in shown and f"{node.runs_started} started" in shown
    finally:
        assert daemon.stop() == 0


def test_a_conversations_runs_stay_on_its_workspaces_node_and_a_canceled_runs_changes_are_undone_there(ray_daemon, ray_cluster,
                                                                                                        conv, tmp_path):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "kept.txt").write_text("as it was\n")
    argv, fifo, tag = spawn_marker(tmp_path, conv)
    change_then_hang = ["sh", "-c", f"echo changed > kept.txt; {argv[2]}"]
    with ray_daemon.client() as client:
        client.start_conversation(conv, metadata={"workspace": str(workspace)})
        client.configure_skills(conv, ["run_command"])
        refs = []
        for text in ("one", "two", "three"):
            client.send_user_message(conv, text)
            refs.append(client.generate_assistant_reply(conv))
            client.await_generation(conv, refs[-1])
        client.send_user_message(conv, "change it, then hang")
        command = {"tool_calls": [{"name": "run_command", "arguments": {"argv": change_then_hang}}]}
        ref = client.generate_assistant_reply(conv, backend_opts={"script": [command, {"text": "never"}]})
        wait_for_marker(fifo)
        assert (workspace / "kept.txt").read_text() == "changed\n"
        tool = find_tagged(tag)
        node = node_of_process(tool.pid, ray_cluster)
        client.cancel_generation(conv)
        with pytest.raises(GenerationCanceled):
            client.await_generation(conv, ref)
        notes = wait_until(lambda: [e for e in client.conversation_thread_entries(conv) if e.event == "workspace_restored"], 15,
                           "the workspace restored")
    assert (workspace / "kept.txt").read_text() == "as it was\n"
    assert notes[-1].data["workspace"] == "restored"
    lines = [wait_until(lambda r=r: finished_lines(ray_daemon, r), 10, "run.finished")[0] for r in [*refs, ref]]
    assert {field(line, "node") for line in lines} == {node}  # every run of it, on the node that holds its workspace
    assert ray_daemon.log().count(f"workspace.pinned workspace={workspace}") == 1


def test_a_node_lost_mid_run_ends_that_run_once_as_node_lost_and_new_runs_go_to_the_nodes_left(ray_cluster, tmp_path, conv):
    extra = ray_cluster.add_node(num_cpus=1)
    daemon = RayDaemon(tmp_path / "d", ray_cluster.address).start()
    removed = False
    try:
        daemon.wait_for_nodes(3)
        markers = [spawn_marker(tmp_path, f"{conv}_{i}") for i in range(3)]
        with daemon.client() as client:
            refs = {}
            for i, (argv, fifo, _) in enumerate(markers):  # one per node: placement goes to the least loaded
                client.send_user_message(f"{conv}_{i}", "hi")
                refs[i] = client.generate_assistant_reply(f"{conv}_{i}", backend_opts={"spawn": argv, "delay_ms": 60_000})
                wait_for_marker(fifo)
            on = {i: node_of_process(find_tagged(tag).pid, ray_cluster) for i, (_, _, tag) in enumerate(markers)}
            assert sorted(on.values()) == sorted(n.node_id for n in ray_cluster.list_all_nodes())
            lost = next(i for i, node in on.items() if node == extra.node_id)
            lost_tool = find_tagged(markers[lost][2])
            ray_cluster.remove_node(extra, allow_graceful=False)  # its raylet killed
            removed = True
            with pytest.raises(LLMError) as raised:
                client.await_generation(f"{conv}_{lost}", refs[lost])
            assert raised.value.category == "unknown"
            assert raised.value.details["reason"] == "node_lost" and raised.value.details["node"] == extra.node_id
            wait_until(lambda: gone(lost_tool), 30, "the lost node's tool process gone with it")
            def two_nodes():
                status = client.status()
                return status if len(status.nodes) == 2 else None

            status = wait_until(two_nodes, 30, "the lost node out of status")
            assert status.nodes_lost == 1 and extra.node_id not in {n.node for n in status.nodes}
            # Exactly one outcome: the lost run's is final, journaled once.
            finished = [e for e in client.conversation_thread_entries(f"{conv}_{lost}") if e.event == "run_finished"]
            assert len(finished) == 1
            # The daemon serves on; new runs go to the nodes left; the others' runs were untouched.
            _, result = client.send_and_generate(f"{conv}_new", "still here")
            assert result.text == "still here"
            for i in set(refs) - {lost}:
                client.cancel_generation(f"{conv}_{i}")
                with pytest.raises(GenerationCanceled):
                    client.await_generation(f"{conv}_{i}", refs[i])
    finally:
        if not removed:
            ray_cluster.remove_node(extra, allow_graceful=False)
        assert daemon.stop() == 0


def test_no_cluster_is_a_fast_transport_error_and_the_daemon_connects_when_it_comes_back(tmp_path, conv):
    from ray.cluster_utils import Cluster
    from ray.util import get_node_ip_address

    port, host = _free_port(), get_node_ip_address()  # the address Ray's nodes use here
    daemon = RayDaemon(tmp_path / "d", f"{host}:{port}").start()  # nothing there yet
    cluster = None
    try:
        with daemon.client() as client:
            wait_until(lambda: client.status().cluster == "down", 120, "the daemon to give up on an absent cluster")
            client.send_user_message(conv, "hi")
            ref = client.generate_assistant_reply(conv)
            with pytest.raises(LLMError) as raised:
                client.await_generation(conv, ref, timeout_ms=5_000)  # fast: no hang
            assert raised.value.category == "transport"
            assert f"{host}:{port}" in raised.value.message
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False, "gcs_server_port": port})
            daemon.wait_for_nodes(1, timeout_s=120)
            _, result = client.send_and_generate(conv, "back")
            assert result.text == "back"
            cluster.shutdown()  # the whole cluster goes away
            cluster = None

            def cluster_gone():
                status = client.status()
                return status.cluster == "down" and not status.nodes

            wait_until(cluster_gone, 120, "the daemon to see the cluster gone: its bridge, and every agent")
            ref = client.generate_assistant_reply(conv)
            with pytest.raises(LLMError) as raised:
                client.await_generation(conv, ref, timeout_ms=5_000)
            assert raised.value.category == "transport"
    finally:
        if cluster is not None:
            cluster.shutdown()
        assert daemon.stop() == 0
    assert not marked_processes(daemon.instance)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_address_local_starts_a_ray_of_the_daemons_own_and_stops_it_with_the_daemon(tmp_path, conv):
    daemon = RayDaemon(tmp_path / "d", "local")
    daemon.start()
    try:
        daemon.wait_for_nodes(1, timeout_s=120)
        with daemon.client() as client:
            _, result = client.send_and_generate(conv, "on a ray of its own")
        assert result.text == "on a ray of its own"
        ray_processes = [p for p in daemon.descendants() if "raylet" in " ".join(p.cmdline()) or "gcs_server" in p.name()]
        assert ray_processes  # the daemon's bridge started them
    finally:
        assert daemon.stop() == 0  # and Daemon.stop checks no descendant of it outlived it


@pytest.mark.parametrize(("table", "says"), [
    ('kind = "kubernetes"', "executor"),
    ('kind = "ray"\nworkspaces = "everywhere"', "workspaces"),
    ('kind = "ray"\nnodes = 3', "nodes"),
])
def test_a_bad_executor_table_is_refused_at_start(tmp_path, table, says):
    from genvisor.daemon.config import ConfigError, load_config

    path = tmp_path / "genvisor.toml"
    path.write_text(f"[executor]\n{table}\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    assert says in str(raised.value)


def test_a_killed_daemons_runs_end_on_their_nodes_and_a_restart_undoes_their_changes_there(ray_cluster, tmp_path, conv):
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "kept.txt").write_text("as it was\n")
    argv, fifo, tag = spawn_marker(tmp_path, conv)
    command = {"tool_calls": [{"name": "run_command", "arguments": {"argv": ["sh", "-c", f"echo changed > kept.txt; {argv[2]}"]}}]}
    daemon = RayDaemon(tmp_path / "d", ray_cluster.address)
    daemon.start()
    try:
        daemon.wait_for_nodes(2)
        with daemon.client() as client:
            client.start_conversation(conv + "_idle")  # never runs: no node holds anything of it
            client.start_conversation(conv, metadata={"workspace": str(workspace)})
            client.configure_skills(conv, ["run_command"])
            client.send_user_message(conv, "change it, then hang")
            ref = client.generate_assistant_reply(conv, backend_opts={"script": [command, {"text": "never"}]})
            wait_for_marker(fifo)
        tool = find_tagged(tag)
        assert (workspace / "kept.txt").read_text() == "changed\n"
        daemon.kill()  # kill -9: its bridge goes (PDEATHSIG), Ray ends the bridge's actors, their agents end their runs
        wait_until(lambda: not daemon.marked(), 60, lambda: f"the nodes' processes of the killed daemon gone: {daemon.marked()}")
        assert gone(tool)
        daemon.start()
        with daemon.client() as client:
            with pytest.raises(LLMError) as raised:
                client.await_generation(conv, ref)
            assert raised.value.details["reason"] == "daemon_restarted"
            assert raised.value.details["workspace"] == "restored"  # undone on its node, before the daemon served
        assert (workspace / "kept.txt").read_text() == "as it was\n"
        # The restart's repairs asked only the node that ran something there: they pinned nothing.
        pins = msgspec.json.decode((daemon.directory / "state" / "cluster-workspaces.json").read_bytes())
        assert list(pins) == [str(workspace)]
    finally:
        assert daemon.stop() == 0


def test_an_agent_gone_silent_ends_its_runs_and_is_replaced_by_a_fresh_one(ray_cluster, tmp_path, conv):
    daemon = RayDaemon(tmp_path / "d", ray_cluster.address)
    daemon.start()
    stopped: list[psutil.Process] = []
    try:
        daemon.wait_for_nodes(2)
        with daemon.client() as client:
            ref, tool = start_tool_run(client, conv, tmp_path)
            agent = next(p for p in tool.parents() if "genvisor.supervisor.node_agent" in " ".join(p.cmdline()))
            agent.suspend()  # SIGSTOP: alive, and silent
            stopped.append(agent)
            with pytest.raises(LLMError) as raised:
                client.await_generation(conv, ref, timeout_ms=60_000)
            assert raised.value.details["reason"] == "node_lost" and raised.value.details["lost"].startswith("agent_silent")
            # Ray ended that agent (its tool with it), and the bridge started a fresh one on the node.
            wait_until(lambda: gone(tool), 30, "the silent agent's run's tool gone")
            wait_until(lambda: gone(agent), 30, "the silent agent killed")
            daemon.wait_for_nodes(2)
            _, result = client.send_and_generate(conv + "_after", "served")
            assert result.text == "served"
    finally:
        for process in stopped:
            if process.is_running():
                process.resume()
        assert daemon.stop() == 0


def test_first_runs_of_many_conversations_at_once_are_all_placed(ray_daemon, conv):
    """Each pins its workspace to a node, and the pins are written to one file: at once."""
    errors: list[BaseException] = []

    def first_turn(i: int) -> None:
        try:
            with ray_daemon.client() as client:
                _, result = client.send_and_generate(f"{conv}_{i}", f"hello {i}")
                assert result.text == f"hello {i}"
        except BaseException as exc:  # noqa: BLE001 — collected, and failed below
            errors.append(exc)

    threads = [threading.Thread(target=first_turn, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    pins = msgspec.json.decode((ray_daemon.directory / "state" / "cluster-workspaces.json").read_bytes())
    assert sum(1 for workspace in pins if f"{conv}_" in workspace) == 12


def test_a_bridge_that_dies_costs_no_run(ray_cluster, tmp_path, conv):
    """The Ray driver (the bridge) is ended by Ray when the GCS is out of reach for a few
    seconds; the agents' actors are detached, so the runs on them go on, and the next
    bridge finds the same agents."""
    daemon = RayDaemon(tmp_path / "d", ray_cluster.address)
    daemon.start()
    try:
        daemon.wait_for_nodes(2)
        with daemon.client() as client:
            ref, tool = start_tool_run(client, conv, tmp_path)
            [bridge] = [p for p in daemon.descendants() if "genvisor.supervisor.ray_bridge" in " ".join(p.cmdline())]
            bridge.kill()
            wait_until(lambda: daemon.log().count("cluster.connected") == 2, 60, "a second bridge connected")
            status = client.status()
            assert status.nodes_lost == 0 and len(status.nodes) == 2
            assert not gone(tool)  # the run went on
            client.cancel_generation(conv)
            with pytest.raises(GenerationCanceled):  # canceled, not node_lost: it was still running
                client.await_generation(conv, ref)
            wait_until(lambda: gone(tool), 15, "the tool gone with its run")
            _, result = client.send_and_generate(conv + "_after", "served")
            assert result.text == "served"
    finally:
        assert daemon.stop() == 0
