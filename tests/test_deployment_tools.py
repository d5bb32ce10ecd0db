"""The deployment tools without a deployment: prepared files, commands, process shutdown."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID
from flwr.common.config import parse_config_args
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink

from tests.conftest import make_config
from deploy import commands
from deploy.launch import check_project, describe_failures
from deploy.layout import Deployment, DeploymentError
from deploy.prepare import instructions, prepare
from deploy.processes import Supervisor, living
from fl_app.data import data_source
from fl_app.node_data import load_node_file

pytestmark = pytest.mark.timeout(300)
HOSTS = ["127.0.0.1", "localhost"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Deployment:
    """Three nodes' files cut by the Dirichlet partitioner."""
    return prepare(tmp_path_factory.mktemp("prep") / "dep", 3, "partitioner='dirichlet'", HOSTS)


def test_node_files_are_the_partitions_and_load_as_node_data(prepared):
    cfg = make_config(partitioner="dirichlet")
    source = data_source(cfg)
    sizes = []
    for i, node in enumerate(prepared.nodes):
        expected = source.partition(i, 3)
        with np.load(node.data) as archive:
            np.testing.assert_array_equal(archive["x"], expected.x)
            np.testing.assert_array_equal(archive["y"], expected.y)
        data = load_node_file(str(node.data), source.spec, cfg)
        assert len(data.train) + len(data.val) == len(expected)
        sizes.append(len(expected))
    assert len(set(sizes)) > 1  # Dirichlet: unequal shares, not an IID split
    assert sum(sizes) == 1797 - len(source.test_set())  # all of digits but the server's test set


def test_csv_node_files_load_as_node_data(tmp_path):
    dep = prepare(tmp_path / "dep", 2, "", HOSTS, data_format="csv")
    cfg = make_config()
    expected = data_source(cfg).partition(1, 2)
    data = load_node_file(str(dep.nodes[1].data), data_source(cfg).spec, cfg)
    assert len(data.train) + len(data.val) == len(expected)
    assert sorted(np.concatenate([data.train.y, data.val.y])) == sorted(expected.y)


def test_server_certificate_is_signed_by_the_ca_for_the_hosts(prepared):
    ca = x509.load_pem_x509_certificate(prepared.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(prepared.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    key = serialization.load_pem_private_key(prepared.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert prepared.server_key.stat().st_mode & 0o077 == 0


def test_node_keys_are_p384_openssh_pairs(prepared):
    for node in prepared.nodes:
        private = serialization.load_ssh_private_key(node.key.read_bytes(), None)
        public = serialization.load_ssh_public_key(node.public_key.read_bytes())
        assert private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
        assert node.key.stat().st_mode & 0o077 == 0
    assert len({node.public_key.read_bytes() for node in prepared.nodes}) == 3


def test_manifest_round_trips_and_missing_one_is_explained(prepared, tmp_path):
    assert Deployment.load(prepared.root) == prepared
    with pytest.raises(DeploymentError, match="deploy.prepare"):
        Deployment.load(tmp_path)


def test_printed_commands_parse_with_the_installed_flower(prepared):
    lines = [line for line in instructions(prepared).splitlines()
             if line and not line.startswith("#")]
    link, nodes = lines[0], [line for line in lines if "flower-supernode" in line]
    link_args = _parse_args_run_superlink().parse_args(shlex.split(link)[2:])
    assert link_args.enable_supernode_auth and not link_args.insecure
    assert not link_args.runtime_dependency_install
    assert link_args.ssl_ca_certfile == str(prepared.ca_cert)
    assert len(nodes) == 3
    for node, line in zip(prepared.nodes, nodes):
        args = _parse_args_run_supernode().parse_args(shlex.split(line)[2:])
        assert args.auth_supernode_private_key == str(node.key)
        assert args.root_certificates == str(prepared.ca_cert) and not args.insecure
        assert parse_config_args([args.node_config]) == {"data-path": str(node.data)}
    assert sum("flwr supernode register" in line for line in lines) == 3
    run = shlex.split(lines[-1].split("&&", 1)[1])
    assert run[1:5] == ["flwr", "run", ".", "local-deployment"]
    assert "min-available-clients=3" in run[run.index("--run-config") + 1]


def test_config_string_carries_any_path_flower_can_parse():
    for value in ["/tmp/a b/x.npz", "/tmp/it's/x.npz", r"C:\data\x.npz"]:
        assert parse_config_args([f"k={commands.config_string(value)}"]) == {"k": value}
    with pytest.raises(DeploymentError, match="quotes"):
        commands.config_string("a'b\"c")


def test_a_project_with_legacy_federations_is_refused(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.flwr.federations]\ndefault = 'x'\n")
    with pytest.raises(DeploymentError, match="federations"):
        check_project(tmp_path)


def test_failures_are_described_by_node_name():
    history = {"rounds": [{"round": 1, "fit": {"failures": [
        {"client": "123", "error": "ValueError: node 123: data file /d/node-1.npz is bad"},
        {"client": "7", "error": "ValueError: TTL expired"}]}}]}
    assert describe_failures(history, {"node-0": 99, "node-1": 123}) == [
        "round 1: node-1 (node id 123) failed: ValueError: node 123: data file /d/node-1.npz "
        "is bad",
        "round 1: node 7 failed: ValueError: TTL expired"]


TREE = """
import subprocess, sys, time
# a child in its own session (as Flower's SuperExec is), which outlives a process-group kill
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print("started", flush=True)
time.sleep(600)
"""


def _cmdline(proc: psutil.Process) -> str:
    """The command line of a process, or "" once it has exited (a zombie has none)."""
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return ""


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_supervisor_stops_descendants_in_other_sessions_on_interrupt(tmp_path):
    seen: set[int] = set()
    with pytest.raises(KeyboardInterrupt):
        with Supervisor(tmp_path, echo=None, poll_seconds=0.1) as sup:
            parent = sup.start("tree", commands.Command([sys.executable, "-c", TREE]))
            _wait_for(lambda: len(sup.seen_pids()) >= 2)
            seen = sup.seen_pids()
            raise KeyboardInterrupt  # Ctrl-C while everything runs
    assert parent.pid in seen and len(seen) == 2
    assert not living(seen)
    assert (tmp_path / "tree.log").read_text().strip() == "started"


def test_launcher_stops_every_process_on_ctrl_c(prepared):
    """The real CLI: SuperLink and SuperNodes up, then SIGINT; nothing it started survives."""
    launcher = subprocess.Popen([sys.executable, "-m", "deploy.launch", "--dir",
                                 str(prepared.root), "--quiet"],
                                cwd=Path(__file__).resolve().parents[1],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[int, psutil.Process] = {}

    def supernodes_up() -> bool:
        assert launcher.poll() is None, launcher.stdout.read()
        for proc in psutil.Process(launcher.pid).children(recursive=True):
            seen.setdefault(proc.pid, proc)
        cmdlines = [_cmdline(p) for p in seen.values()]
        return sum("flower-supernode" in c for c in cmdlines) == 3 and any(
            "flower-superexec" in c for c in cmdlines)

    try:
        _wait_for(supernodes_up, timeout=120)
        launcher.send_signal(signal.SIGINT)
        output, _ = launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130, output
    assert "every process was stopped" in output
    alive = living(seen)
    assert not alive, [_cmdline(seen[pid]) for pid in alive]
