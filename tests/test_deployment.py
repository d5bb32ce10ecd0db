"""A real deployment: one SuperLink and real SuperNodes as separate processes on 127.0.0.1,
with TLS and SuperNode authentication, each node on its own data file.

One SuperLink serves the module (starting Flower's processes costs more than the rounds):
a SuperNode whose key was never registered is refused (flwr 1.41: Flower's exit code 305,
process exit status 1); three SuperNodes run 3 rounds of
weighted-fedavg, then 3 FedBuff versions (server-loop='fedbuff'); then a fourth node
whose data file is corrupt joins for a further run,
which finishes on the other three and records and logs the error naming that node and
file. The run's results are private (mode 600/700: Flower's processes run with umask 077).
When the module ends (pass or fail) every process is stopped, checked by pid.
"""

from __future__ import annotations

import re
import socket
import ssl
import time
from pathlib import Path
from types import SimpleNamespace

import keras
import pytest

from deploy.launch import COMPLETED, LocalDeployment
from deploy.layout import NodeFiles
from deploy.pki import make_node_keys
from deploy.prepare import prepare
from deploy.processes import Supervisor, living
from fl_app.server.outputs import MODEL_FILE

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
PROJECT_DIR = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 600.0


def _extra_node(dep, name: str, data: Path) -> NodeFiles:
    key = dep.root / "keys" / name
    return NodeFiles(name, key, data, make_node_keys(key))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """SuperLink + 3 registered SuperNodes running; a corrupt node registered, not started."""
    root = tmp_path_factory.mktemp("deployment")
    dep = prepare(root / "dep", 3, "", ["127.0.0.1", "localhost"])
    good = dep.nodes[0].data.read_bytes()
    corrupt_file = dep.root / "data" / "node-corrupt.npz"
    corrupt_file.write_bytes(good[: len(good) // 2])  # a truncated upload
    corrupt = _extra_node(dep, "node-corrupt", corrupt_file)
    stranger = _extra_node(dep, "stranger", dep.nodes[0].data)  # never registered
    supervisor = Supervisor(root / "logs", echo=print)
    with supervisor:
        # the nodes accept the prepared model (mlp) and the second test run's (logreg) only
        local = LocalDeployment(dep, supervisor, root / "state", run_configs=["model='logreg'"])
        local.start_superlink()
        for node in (*dep.nodes, corrupt):
            local.register(node)
        for node in dep.nodes:
            local.start_node(node)
        stranger_proc = local.start_node(stranger, required=False)
        yield SimpleNamespace(dep=dep, local=local, sup=supervisor, corrupt=corrupt,
                              stranger=stranger_proc, out=root / "results")
    seen = supervisor.seen()
    assert not living(seen)  # a survivor would also have raised ProcessesLeft
    cmdlines = list(seen.values())
    # the SuperNodes (3 healthy, the corrupt one, the stranger), each with our executor and
    # its warm ClientApp process (--isolation process: no SuperExec of Flower's under them),
    # and the SuperLink's own SuperExec (for the ServerApp)
    assert sum("flower-supernode" in cmdline for cmdline in cmdlines) >= len(dep.nodes) + 2
    assert sum("fl_app.worker.executor" in cmdline for cmdline in cmdlines) >= len(dep.nodes) + 2
    assert sum("fl_app.worker.warm_clientapp" in cmdline for cmdline in cmdlines) >= len(dep.nodes)
    assert sum("flower-superexec" in cmdline for cmdline in cmdlines) == 1, cmdlines


def _rounds(outcome) -> list[dict]:
    assert outcome.status == COMPLETED
    assert outcome.history is not None and outcome.history["stopped"] == "num-server-rounds"
    return outcome.history["rounds"]


def _three_rounds(cluster, name: str, run_config: str, clients: int):
    """Run the app on the cluster; check it made rounds 0-3 from `clients` updates each,
    with no failure; return the outcome and its rounds."""
    outcome = cluster.local.run_app(
        PROJECT_DIR, cluster.local.run_config(cluster.out / name, run_config), RUN_TIMEOUT)
    rounds = _rounds(outcome)
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    for record in rounds[1:]:
        assert record["fit"]["num_clients"] == clients and record["fit"]["num_failures"] == 0
    return outcome, rounds


def test_superlink_serves_tls_with_the_prepared_ca(cluster):
    context = ssl.create_default_context(cafile=str(cluster.dep.ca_cert))
    with socket.create_connection(("127.0.0.1", cluster.local.port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            subject = dict(item[0] for item in tls.getpeercert()["subject"])
    assert subject["commonName"] == "127.0.0.1"
    untrusted = ssl.create_default_context()  # the system CAs do not know this certificate
    with socket.create_connection(("127.0.0.1", cluster.local.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            untrusted.wrap_socket(raw, server_hostname="127.0.0.1")


def test_supernode_without_a_registered_key_is_refused(cluster):
    deadline = time.monotonic() + 120
    while cluster.stranger.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    assert cluster.stranger.poll() == 1  # flwr_exit: status 1 for every error exit code
    stranger_log = cluster.stranger.log_text()
    assert "Exit Code: 305" in stranger_log  # SUPERNODE_CONNECTION_ERROR
    assert "Failed to activate SuperNode" in stranger_log
    link_log = cluster.local.superlink.log_path.read_text()
    assert "No SuperNode found with the given public key" in link_log


def test_three_supernodes_train_with_tls_and_node_auth(cluster):
    outcome, rounds = _three_rounds(cluster, "healthy",
                                    "num-server-rounds=3 fraction-evaluate=0.0", clients=3)
    accuracy = [r["centralized"]["accuracy"] for r in rounds]
    assert accuracy[-1] > accuracy[0] + 0.3, accuracy
    assert (outcome.out_dir / MODEL_FILE).is_file()
    # where a fit message's time went: after round 1 the warm ClientApp processes hold
    # TensorFlow, the data and the model (no process start, no import, no load, no build)
    for record in rounds[2:]:
        timing = record["fit"]["timing"]
        assert set(timing) == {"process", "imports", "data", "model", "training"}, timing
        assert timing["data"] < 0.05 and timing["model"] < 0.05, timing
        assert timing["imports"] < 0.05 and timing["process"] == 0.0, timing

    # the run's log (the ServerApp's, streamed by `flwr log`): progress, not Flower's chatter
    run_log = (cluster.sup.log_dir / "run.log").read_text()
    assert "round   3/3 | 3 sampled: 3 ok, 0 failed, 0 rejected" in run_log, run_log
    assert "configure_fit" not in run_log and "[SUMMARY]" not in run_log, run_log
    # each node's executor ran every message (the client-key query, 3 fits) in one warm
    # ClientApp process, a child of the executor
    for node in cluster.dep.nodes:
        assert len(_warm_pids(cluster, node)) == 1
        assert _executor_log(cluster, node).count(" done in ") == 4
    # the ServerApp runs under the SuperLink's umask 077: its results are private
    for path in [outcome.out_dir, *outcome.out_dir.rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o700 if path.is_dir() else 0o600), path


def test_a_second_run_with_another_model_trains_in_the_same_warm_processes(cluster):
    pids = {node.name: _warm_pids(cluster, node) for node in cluster.dep.nodes}
    run_config = cluster.local.run_config(cluster.out / "logreg",
                                          "num-server-rounds=2 model='logreg'")
    outcome = cluster.local.run_app(PROJECT_DIR, run_config, RUN_TIMEOUT)
    rounds = _rounds(outcome)
    accuracy = [r["centralized"]["accuracy"] for r in rounds]
    assert accuracy[-1] > accuracy[0] + 0.3, accuracy
    assert rounds[-1]["distributed"]["accuracy"] > 0.5  # the clients evaluated it too
    assert outcome.history["config"]["model"] == "logreg"
    saved = keras.saving.load_model(outcome.out_dir / MODEL_FILE)
    assert saved.name == "logreg" and len(saved.get_weights()) == 2  # one Dense layer
    for node in cluster.dep.nodes:  # the same warm processes, each building the second model
        assert _warm_pids(cluster, node) == pids[node.name]


def _executor_log(cluster, node) -> str:
    return (cluster.sup.log_dir / f"{node.name}-executor.log").read_text()


def _warm_pids(cluster, node) -> list[str]:
    """The pids of the warm ClientApp processes `node`'s executor started, in order."""
    return re.findall(r"started a warm ClientApp process \(pid (\d+)\)",
                      _executor_log(cluster, node))


def test_prepared_nodes_refuse_a_model_they_were_not_prepared_with(cluster):
    """Node policy on real SuperNodes: nodes prepared with mlp (and told logreg) refuse a
    run's `model='cnn'` before importing or building anything; the server logs each refusal
    naming the node, and the refusal is a normal reply (the warm process lives on)."""
    pids = {node.name: _warm_pids(cluster, node) for node in cluster.dep.nodes}
    run_config = cluster.local.run_config(cluster.out / "cnn",
                                          "num-server-rounds=1 fraction-evaluate=0.0 model='cnn'")
    cluster.local.run_app(PROJECT_DIR, run_config, RUN_TIMEOUT)
    run_log = (cluster.sup.log_dir / "run.log").read_text()
    for node in cluster.dep.nodes:
        node_id = cluster.local.node_ids[node.name]
        assert f"node {node_id} refuses run-config model='cnn'" in run_log, run_log[-3000:]
        assert _warm_pids(cluster, node) == pids[node.name]


def test_fedbuff_runs_on_the_superlink(cluster):
    _, rounds = _three_rounds(cluster, "fedbuff", "server-loop='fedbuff' num-server-rounds=3 "
                              "fedbuff-buffer-size=2 fraction-evaluate=0.0", clients=2)
    # three nodes start on version 0 and two updates make a version: the third is stale
    assert max(r["fit"]["staleness_max"] for r in rounds[1:]) >= 1
    accuracy = [r["centralized"]["accuracy"] for r in rounds]
    assert accuracy[-1] > accuracy[0] + 0.2, accuracy


def test_corrupt_node_file_fails_that_node_only_and_is_named(cluster):
    corrupt = cluster.corrupt
    cluster.local.start_node(corrupt)
    node_id = str(cluster.local.node_ids[corrupt.name])
    run_config = cluster.local.run_config(
        cluster.out / "corrupt",
        "num-server-rounds=1 fraction-evaluate=0.0 min-available-clients=4")
    outcome = cluster.local.run_app(PROJECT_DIR, run_config, RUN_TIMEOUT)
    rounds = _rounds(outcome)
    for record in rounds[1:]:
        fit = record["fit"]
        assert fit["num_clients"] == 3 and fit["num_failures"] == 1
        (failure,) = fit["failures"]
        assert f"node {node_id}" in failure["error"] and str(corrupt.data) in failure["error"]
        assert failure["client"] == node_id
        assert "DataError" in failure["error"]
    assert rounds[-1]["centralized"]["accuracy"] > rounds[0]["centralized"]["accuracy"]
    run_log = (cluster.sup.log_dir / "run.log").read_text()
    assert f"node {node_id}: data file {corrupt.data}" in run_log  # the server logged it
    # the node logged it too (its executor: the task failed with the ClientApp's error)
    assert "DataError" in (cluster.sup.log_dir / f"{corrupt.name}-executor.log").read_text()


def test_secagg_rounds_on_real_supernodes_survive_a_dropout(cluster):
    """SecAgg+ between the real SuperLink and SuperNodes. The corrupt node (started by the
    test above, or here) takes part in the key exchange, then fails to load its data when
    asked to train: a dropout after sharing its keys, which the others' shares unmask; the
    rounds finish on the other three and name it as the failure."""
    corrupt = cluster.corrupt
    if corrupt.name not in cluster.local.required:
        cluster.local.start_node(corrupt)
    node_id = str(cluster.local.node_ids[corrupt.name])
    run_config = cluster.local.run_config(
        cluster.out / "secagg", "num-server-rounds=2 fraction-evaluate=0.0 "
        "min-available-clients=4 secure-aggregation='secagg+' examples-cap-factor=0 "
        "secagg-min-clients=3 secagg-reconstruction-threshold=0.75 "  # a toy cohort
        "verbose=true")  # Flower's workflow lines (quiet by default) show the protocol ran
    outcome = cluster.local.run_app(PROJECT_DIR, run_config, RUN_TIMEOUT)
    rounds = _rounds(outcome)
    assert outcome.history["config"]["secure-aggregation"] == "secagg+"
    for record in rounds[1:]:
        fit = record["fit"]
        assert fit["num_clients"] == 3 and fit["num_failures"] == 1
        assert [f["client"] for f in fit["failures"]] == [node_id]
        assert "SecAgg+" in fit["failures"][0]["error"]
        assert "DataError" in fit["failures"][0]["error"]  # the node's own reason
    assert rounds[-1]["centralized"]["accuracy"] > rounds[0]["centralized"]["accuracy"] + 0.2
    assert (outcome.out_dir / MODEL_FILE).is_file()
    run_log = (cluster.sup.log_dir / "run.log").read_text()
    assert run_log.count("Secure aggregation completed") >= 2, run_log[-3000:]
