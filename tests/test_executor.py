"""The node's executor (`fl_app.worker.executor`) against a real TLS SuperLink and SuperNodes.

One SuperLink with two authenticated SuperNodes (`--isolation process`, each with its
SuperExec secret and our executor next to it) serves the module. The probe app
(tests/apps/executor_probe) asks the first node for its ClientApp's process id, makes it
crash or hang, and asks again: the same warm process answers until it fails; a crash or
a hang fails that one message with an error naming the node, and the next message gets a
fresh process. A process with a wrong secret is refused by the real SuperNode (HTTP
401/403) and takes no task; the executor exits with status 0 when its SuperNode ends.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from deploy import commands
from deploy.launch import COMPLETED, LocalDeployment
from deploy.prepare import prepare
from deploy.processes import Supervisor, living
from fl_app.worker.secret_file import read_secret
from fl_app.worker.task_api import Acquirer, Endpoint, NodeRefused

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PROBE_APP = Path(__file__).resolve().parent / "apps" / "executor_probe"
TASK_TIMEOUT = 8.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A SuperLink and two registered SuperNodes, each with its executor."""
    root = tmp_path_factory.mktemp("executor")
    dep = prepare(root / "dep", 2, "", ["127.0.0.1", "localhost"])
    supervisor = Supervisor(root / "logs", echo=print)
    with supervisor:
        local = LocalDeployment(dep, supervisor, root / "state", task_timeout=TASK_TIMEOUT)
        local.start_superlink()
        for node in dep.nodes:
            local.register(node)
        nodes = {node.name: local.start_node(node) for node in dep.nodes}
        yield SimpleNamespace(dep=dep, local=local, sup=supervisor, nodes=nodes, root=root)
    assert not living(supervisor.seen())


def _probe(cluster, name: str, actions: str) -> list[dict]:
    """Run the probe app with `actions`; its replies."""
    out = cluster.root / name
    out.mkdir()
    outcome = cluster.local.run_app(PROBE_APP, [f"actions='{actions}'",
                                                f"out-dir='{out}'"], timeout=300)
    assert outcome.status == COMPLETED, outcome
    return json.loads((out / "probe.json").read_text(encoding="utf-8"))


def _runtime_api(cluster, name: str) -> str:
    argv = cluster.local.executors[name].popen.args
    return argv[argv.index("--runtime-api") + 1]


def test_one_warm_process_until_a_crash_or_a_hang_then_a_fresh_one(cluster):
    replies = _probe(cluster, "probe", "pid,pid,crash,pid,hang,pid")
    pids = [r["pid"] for r in replies]
    assert all(r["error"] is None for r in replies if r["action"] == "pid"), replies
    assert pids[0] == pids[1]  # the same warm process answered both
    crash, hang = replies[2]["error"], replies[4]["error"]
    node = crash.split(":")[0]  # the probe's first node by id: either of the two
    assert node in cluster.nodes, crash
    assert f"{node}: the ClientApp process crashed (exit code 3)" in crash, crash
    assert f"{node}: the ClientApp ran past the task timeout ({TASK_TIMEOUT:g} s)" in hang, hang
    assert len({pids[0], pids[3], pids[5]}) == 3  # a fresh process after each failure
    log = (cluster.sup.log_dir / f"{node}-executor.log").read_text()
    assert log.count("started a warm ClientApp process") == 3, log
    assert "Traceback" not in log, log


def test_a_process_without_the_secret_cannot_take_the_nodes_tasks(cluster):
    endpoint = Endpoint(_runtime_api(cluster, "node-1"))
    stranger = Acquirer(endpoint, b"not the secret" * 4)
    with pytest.raises(NodeRefused, match="HTTP 40[13]"):
        stranger.acquire()
    stranger.close()
    secret_file = commands.executor_secret(cluster.dep, cluster.dep.nodes[1])
    assert secret_file.stat().st_mode & 0o777 == 0o600
    assert secret_file.parent.stat().st_mode & 0o777 == 0o700
    holder = Acquirer(endpoint, read_secret(secret_file))
    assert holder.acquire() is None  # accepted; no task is waiting (the executor took them)
    holder.close()


def test_the_executor_exits_with_its_supernode(cluster):
    executor = cluster.local.executors["node-1"]
    node = cluster.nodes["node-1"]
    cluster.local.required.pop("node-1")
    node.process.terminate()
    deadline = time.monotonic() + 30
    while executor.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert executor.poll() == 0, executor.log_text()
    assert "its SuperNode" in executor.log_text() and "ended: stopping" in executor.log_text()


def test_the_executor_takes_tasks_only_from_a_runtime_api_its_supernode_serves():
    """Another account could bind the port before the SuperNode: the listener must be this
    account's process, and the --parent-pid one when given (`check_listener`)."""
    import os
    import socket

    from fl_app.worker.executor import check_listener

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        assert check_listener(address, None, wait=0.5) == f"nothing listens on {address}"
        sock.listen()
        assert check_listener(address, os.getpid(), wait=5) is None
        problem = check_listener(address, os.getpid() + 1, wait=5)
        assert problem is not None and "is not the SuperNode --parent-pid names" in problem
