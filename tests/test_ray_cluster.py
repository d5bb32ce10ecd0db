"""`run_simulation.py --ray-address` on a real two-node Ray cluster, started and stopped by the
test.

Both nodes run on this machine: a head (`ray start --head`, 1 CPU, resource `head`) and a
second node that joins it (`ray start --address`, 1 CPU, resource `worker`), each as its own
`ray start --block` process, so the test owns their pids (never `ray stop`, which stops
every Ray process of the user). With one CPU per client the app's actor pool has one
ClientAppActor per node, and the clients ran on both nodes if Ray's own record of the
finished `ClientAppActor.run` tasks (the state API: each task's node id) names both node ids.

The cluster lives in a private temporary folder (short: Ray's socket paths must stay under
107 characters), every port it opens is a free one chosen here (so clusters of concurrent
test runs do not collide), and its dashboard is off (Ray's minimal API server that remains
listens on 127.0.0.1). Ray's servers still listen on every interface, and a node told
127.0.0.1 advertises the machine's own IP (Ray turns loopback into a reachable address;
its switch for loopback-only, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, forbids a second
node). Every process is stopped by pid at the end, pass or fail.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from deploy.commands import Command
from deploy.launch import free_port
from deploy.processes import Managed, Supervisor

pytestmark = pytest.mark.slow  # runs Flower simulations or real processes

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
# A real cluster: Ray may advertise the machine's address (tests/conftest.py keeps every
# other test's Ray on 127.0.0.1, which would refuse the second node).
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}
STARTED = "Ray runtime started."


def node_ports() -> list[str]:
    """The options of `ray start` that would otherwise use a fixed default port."""
    return ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()),
            "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()),
            "--metrics-export-port", str(free_port())]


def head_node(temp_dir: Path, port: int) -> Command:
    """The head: GCS on `port`, 1 CPU, no dashboard (Ray still starts its minimal API
    server, on a free port of 127.0.0.1)."""
    return Command([str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
                    "--node-ip-address", HOST, "--port", str(port), "--temp-dir", str(temp_dir),
                    "--num-cpus", "1", "--num-gpus", "0", "--resources", '{"head": 100}',
                    "--object-store-memory", str(100 * 2**20),
                    "--include-dashboard", "false", "--dashboard-host", HOST,
                    "--dashboard-port", str(free_port()),
                    "--ray-client-server-port", str(free_port()), *node_ports()], ENV)


def second_node(port: int) -> Command:
    """A node that joins the head at 127.0.0.1:`port`, 1 CPU."""
    return Command([str(BIN / "ray"), "start", "--address", f"{HOST}:{port}", "--block",
                    "--disable-usage-stats", "--node-ip-address", HOST,
                    "--num-cpus", "1", "--num-gpus", "0", "--resources", '{"worker": 100}',
                    "--object-store-memory", str(100 * 2**20), *node_ports()], ENV)


def wait_started(node: Managed, timeout: float = 120.0) -> None:
    """Wait until `ray start --block` says its node runs; fail if it exits first."""
    deadline = time.monotonic() + timeout
    while STARTED not in node.log_text(wait=0):
        assert node.poll() is None, f"{node.name} exited:\n{node.log_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{node.name} did not start:\n{node.log_text()}"
        time.sleep(0.5)


class Gcs:
    """Ray's own record of the cluster, read from its GCS over gRPC (the service the state
    API reads; the `ray` in this venv is the minimal install, without the dashboard that
    serves `ray.util.state`)."""

    def __init__(self, address: str) -> None:
        import grpc
        from ray.core.generated import gcs_service_pb2_grpc

        self.channel = grpc.insecure_channel(address)
        self.nodes_stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(self.channel)
        self.tasks_stub = gcs_service_pb2_grpc.TaskInfoGcsServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def alive_nodes(self) -> dict[str, str]:
        """The alive nodes: node id (hex) -> `head` or `worker` (its custom resource)."""
        from ray.core.generated import gcs_pb2, gcs_service_pb2

        reply = self.nodes_stub.GetAllNodeInfo(gcs_service_pb2.GetAllNodeInfoRequest(),
                                               timeout=10)
        return {node.node_id.hex(): "head" if "head" in node.resources_total else "worker"
                for node in reply.node_info_list
                if node.state == gcs_pb2.GcsNodeInfo.GcsNodeState.ALIVE}

    def task_nodes(self, name: str) -> list[str]:
        """The node id (hex) of every attempt of the tasks called `name` that ran on a node."""
        from ray.core.generated import gcs_service_pb2

        request = gcs_service_pb2.GetTaskEventsRequest(limit=10_000)
        name_filter = request.filters.task_name_filters.add()
        name_filter.task_name = name
        reply = self.tasks_stub.GetTaskEvents(request, timeout=10)
        return [(event.state_updates.node_id or event.task_info.node_id).hex()
                for event in reply.events_by_task
                if event.state_updates.node_id or event.task_info.node_id]

    def wait_nodes(self, count: int, timeout: float = 60.0) -> dict[str, str]:
        """The alive nodes, once there are `count` of them."""
        deadline = time.monotonic() + timeout
        while len(nodes := self.alive_nodes()) != count:
            assert time.monotonic() < deadline, f"the cluster has nodes {nodes}, not {count}"
            time.sleep(0.5)
        return nodes

    def wait_task_nodes(self, name: str, timeout: float = 30.0) -> list[str]:
        """`task_nodes(name)` once their number stops growing (workers report task events
        to the GCS about once a second)."""
        deadline = time.monotonic() + timeout
        seen = self.task_nodes(name)
        while time.monotonic() < deadline:
            time.sleep(2.0)
            now = self.task_nodes(name)
            if now and len(now) == len(seen):
                break
            seen = now
        return seen


def test_run_simulation_runs_clients_on_both_nodes_of_a_ray_cluster(tmp_path):
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-"))  # private (0700) and short
    port = free_port()
    out = tmp_path / "out"
    supervisor = Supervisor(tmp_path / "logs", echo=None)
    gcs = None
    try:
        with supervisor:
            head = supervisor.start("ray-head", head_node(temp_dir, port))
            wait_started(head)
            node = supervisor.start("ray-node", second_node(port))
            wait_started(node)
            gcs = Gcs(f"{HOST}:{port}")
            nodes = gcs.wait_nodes(2)
            assert sorted(nodes.values()) == ["head", "worker"]

            start = time.monotonic()
            run = supervisor.run("run-simulation", Command(
                [sys.executable, "run_simulation.py", "--ray-address", f"{HOST}:{port}",
                 "--num-supernodes", "4", "--num-cpus-per-client", "1",
                 "--run-config", "num-server-rounds=2 local-epochs=1", "--out", str(out)],
                ENV, umask=None), timeout=400, cwd=ROOT)
            log = run.log_text()
            assert run.popen.returncode == 0, log[-4000:]
            print(f"run_simulation.py on the cluster: {time.monotonic() - start:.1f} s")

            history = json.loads((out / "history.json").read_text())
            assert history["stopped"] == "num-server-rounds"
            assert [r["fit"]["num_clients"] for r in history["rounds"][1:]] == [4, 4]

            # One ClientAppActor.run task per message a client handled (2 rounds x 4 fits,
            # plus evaluations), each recorded with the node that ran it.
            ran_on = [nodes.get(node_id, node_id) for node_id in
                      gcs.wait_task_nodes("ClientAppActor.run")]
            counts = {name: ran_on.count(name) for name in set(ran_on)}
            print(f"ClientAppActor.run tasks per node: {counts}")
            assert set(counts) == {"head", "worker"}, counts
            assert len(ran_on) >= 8, counts
            assert head.poll() is None and node.poll() is None  # the cluster outlived the run
    finally:
        if gcs is not None:
            gcs.close()
        assert not supervisor.alive()  # also raised ProcessesLeft on leaving the `with`
        shutil.rmtree(temp_dir, ignore_errors=True)
