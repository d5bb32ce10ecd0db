"""The deployment tools without a deployment: prepared files, commands, process shutdown."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from flwr.common.config import parse_config_args
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from deploy import commands, launch, node_key, pki
from deploy.launch import (
    COMPLETED,
    LocalDeployment,
    RunOutcome,
    check_project,
    cli_json,
    describe_failures,
    listens,
    report,
    start_listening,
)
from deploy.layout import Deployment, DeploymentError
from deploy.prepare import instructions, prepare
from deploy.prepare import main as prepare_main
from deploy.processes import ProcessesLeft, Supervisor, living
from fl_app.data.node_files import load_node_file
from fl_app.data.sources import data_source
from fl_app.data.types import DataSettings
from fl_app.schema import ConfigError
from fl_app.worker.executor import parse_args as executor_parse_args
from tests.conftest import make_config

pytestmark = pytest.mark.timeout(300)
HOSTS = ["127.0.0.1", "localhost"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Deployment:
    """Three nodes' files cut by the Dirichlet partitioner."""
    return prepare(tmp_path_factory.mktemp("prep") / "dep", 3, "partitioner='dirichlet'", HOSTS)


def test_node_files_are_the_partitions_and_load_as_node_data(prepared):
    cfg = make_config(partitioner="dirichlet")
    source = data_source(DataSettings.from_config(cfg))
    sizes = []
    for i, node in enumerate(prepared.nodes):
        expected = source.partition(i, 3)
        with np.load(node.data) as archive:
            np.testing.assert_array_equal(archive["x"], expected.x)
            np.testing.assert_array_equal(archive["y"], expected.y)
        data = load_node_file(str(node.data), source.spec, DataSettings.from_config(cfg))
        assert len(data.train) + len(data.val) == len(expected)
        sizes.append(len(expected))
    assert len(set(sizes)) > 1  # Dirichlet: unequal shares, not an IID split
    assert sum(sizes) == 1797 - len(source.test_set())  # all of digits but the server's test set


def test_csv_node_files_load_as_node_data(tmp_path):
    dep = prepare(tmp_path / "dep", 2, "", HOSTS, data_format="csv")
    cfg = make_config()
    expected = data_source(DataSettings.from_config(cfg)).partition(1, 2)
    data = load_node_file(str(dep.nodes[1].data), data_source(DataSettings.from_config(cfg)).spec,
                          DataSettings.from_config(cfg))
    assert len(data.train) + len(data.val) == len(expected)
    assert sorted(np.concatenate([data.train.y, data.val.y])) == sorted(expected.y)


def _names(cert_path: Path) -> tuple[list[str], list[str]]:
    """The IP addresses and DNS names in a certificate's SANs."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    names = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    return ([str(ip) for ip in names.get_values_for_type(x509.IPAddress)],
            names.get_values_for_type(x509.DNSName))


def test_server_certificate_is_signed_by_the_ca_for_the_hosts(prepared):
    ca = x509.load_pem_x509_certificate(prepared.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(prepared.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert _names(prepared.server_cert) == (["127.0.0.1", "::1"], ["localhost"])
    usage = server.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and usage.value.key_encipherment
    assert not usage.value.key_cert_sign
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    key = serialization.load_pem_private_key(prepared.server_key.read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert prepared.server_key.stat().st_mode & 0o077 == 0


def test_server_certificate_always_covers_the_loopback_names(tmp_path):
    """With --host 0.0.0.0 Flower's SuperExec dials 127.0.0.1 and checks that name."""
    tls = pki.make_tls(tmp_path, ["superlink.example.org", "10.0.0.5"])
    assert _names(tls.server_cert) == (["10.0.0.5", "127.0.0.1", "::1"],
                                       ["superlink.example.org", "localhost"])


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_certificates_pass_openssl_strict_verification(prepared):
    result = subprocess.run(["openssl", "verify", "-x509_strict", "-CAfile",
                             str(prepared.ca_cert), str(prepared.server_cert)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_private_keys_are_created_private_not_chmodded_later(tmp_path, monkeypatch):
    key = tmp_path / "keys" / "node"
    key.parent.mkdir()
    key.write_bytes(b"old")
    key.chmod(0o644)  # a key left by an earlier run must not keep its mode either
    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
    monkeypatch.setattr(Path, "chmod", lambda *args, **kwargs: None)
    previous = os.umask(0o022)
    try:
        tls, pub = pki.make_tls(tmp_path / "certs", ["127.0.0.1"]), pki.make_node_keys(key)
    finally:
        os.umask(previous)
    for path in (tls.server_key, key, tls.ca_cert, tls.server_cert, pub):  # public ones too
        assert path.stat().st_mode & 0o777 == 0o600, path


def test_preparing_a_prepared_folder_again_needs_force(tmp_path, capsys):
    out = tmp_path / "dep"
    dep = prepare(out, 2, "", HOSTS)
    ca = dep.ca_cert.read_bytes()
    with pytest.raises(DeploymentError, match="--force"):
        prepare(out, 2, "", HOSTS)
    assert prepare_main(["--out", str(out), "--num-nodes", "2"]) == 2
    assert "already holds a deployment" in capsys.readouterr().err
    assert dep.ca_cert.read_bytes() == ca
    assert prepare_main(["--out", str(out), "--num-nodes", "2", "--force"]) == 0
    assert dep.ca_cert.read_bytes() != ca


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


def _args_after(line: str, program: str) -> list[str]:
    """The arguments of `program` in a printed shell line (`umask 077 && ENV=... program ...`)."""
    words = shlex.split(line)
    return words[words.index(program) + 1:]


def test_printed_commands_parse_with_the_installed_flower(prepared):
    lines = [line for line in instructions(prepared).splitlines()
             if line and not line.startswith("#")]
    link, nodes = lines[0], [line for line in lines if "flower-supernode" in line]
    link_args = _parse_args_run_superlink().parse_args(_args_after(link, "flower-superlink"))
    assert link_args.enable_supernode_auth and not link_args.insecure
    assert not link_args.runtime_dependency_install
    assert link_args.ssl_ca_certfile == str(prepared.ca_cert)
    assert len(nodes) == 3
    for node, line in zip(prepared.nodes, nodes):
        args = _parse_args_run_supernode().parse_args(_args_after(line, "flower-supernode"))
        assert args.auth_supernode_private_key == str(node.key)
        assert args.root_certificates == str(prepared.ca_cert) and not args.insecure
        assert parse_config_args([args.node_config]) == {
            "data-path": str(node.data), "client-key": node.name, "allow-models": "mlp",
            "allow-data": f"digits,{node.data}"}
        secret = str(commands.executor_secret(prepared, node))
        assert args.isolation == "process" and args.superexec_auth_secret_file == secret
        executor = next(line for line in lines if "fl_app.worker.executor --runtime-api" in line
                        and f"--name {node.name}" in line)
        executor_args = executor_parse_args(_args_after(executor, "fl_app.worker.executor"))
        assert executor_args.runtime_api == f"127.0.0.1:{args.port}"
        assert executor_args.secret_file == Path(secret)
        assert f"fl_app.worker.executor --new-secret --secret-file {secret}" in \
            instructions(prepared)
    assert sum("flwr supernode register" in line for line in lines) == 3
    run = _args_after(lines[-1], "flwr")
    assert run[:3] == ["run", ".", "local-deployment"]
    run_configs = [run[i + 1] for i, arg in enumerate(run) if arg == "--run-config"]
    assert "min-available-clients=3" in run_configs and "fuse-evaluate=true" in run_configs


def test_config_string_carries_any_path_flower_can_parse():
    for value in ["/tmp/a b/x.npz", "/tmp/it's/x.npz", r"C:\data\x.npz"]:
        assert parse_config_args([f"k={commands.config_string(value)}"]) == {"k": value}
    with pytest.raises(DeploymentError, match="quotes"):
        commands.config_string("a'b\"c")


def test_prepared_nodes_accept_only_the_prepared_sources_and_the_launchs(prepared):
    """A prepared node's node config refuses another model or dataset than the prepared ones
    (`fl_app.client.node_policy`), unless the launcher names them; a listed path with a
    comma cannot be written."""
    from fl_app.client.node_policy import NodePolicy, NodePolicyError, check_sources
    from tests.conftest import make_config

    node = prepared.nodes[1]
    policy = NodePolicy.from_node_config(
        parse_config_args([commands.node_config(prepared, node)]))
    check_sources(policy, make_config(partitioner="dirichlet"))
    check_sources(policy, make_config(dataset=str(node.data)))  # the node's own file
    for key, value in (("model", "logreg"), ("dataset", str(prepared.nodes[0].data))):
        with pytest.raises(NodePolicyError, match=f"{key}='{value}'"):
            check_sources(policy, make_config(**{key: value}))
    widened = parse_config_args([commands.node_config(prepared, node, ["model='cnn'"])])
    assert widened["allow-models"] == "mlp,cnn"
    with pytest.raises(DeploymentError, match="comma"):
        commands.config_list(["/data/a,b.npz"])


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


def _python(code: str, *args: str) -> commands.Command:
    return commands.Command([sys.executable, "-c", code, *args])


def test_supervisor_stops_descendants_in_other_sessions_on_interrupt(tmp_path):
    seen: dict[psutil.Process, str] = {}
    with pytest.raises(KeyboardInterrupt):
        with Supervisor(tmp_path, echo=None, poll_seconds=0.1) as sup:
            parent = sup.start("tree", _python(TREE))
            _wait_for(lambda: len(sup.seen()) >= 2)
            seen = sup.seen()
            raise KeyboardInterrupt  # Ctrl-C while everything runs
    assert parent.process in seen and len(seen) == 2
    assert sum("time.sleep(600)" in cmdline for cmdline in seen.values()) == 2
    assert not living(seen)
    assert (tmp_path / "tree.log").read_text().strip() == "started"


def test_supervisor_raises_when_a_process_survives_shutdown(tmp_path, monkeypatch):
    monkeypatch.setattr(Supervisor, "_terminate", staticmethod(lambda procs, grace: None))
    with pytest.raises(ProcessesLeft) as info:
        with Supervisor(tmp_path, echo=None) as sup:
            sleeper = sup.start("sleeper", _python("import time; time.sleep(600)"))
    try:
        assert info.value.survivors == [sleeper.process]
        assert str(sleeper.pid) in str(info.value)
    finally:
        sleeper.process.kill()
        sleeper.popen.wait(timeout=30)


def test_output_is_drained_when_the_echo_breaks(tmp_path):
    """A closed terminal (BrokenPipeError) must not leave a process blocked on a full pipe."""
    def broken_echo(line: str) -> None:
        raise BrokenPipeError("the terminal went away")

    chatty = "for i in range(20000): print(f'line {i:05d} ' + 'x' * 100)"
    with Supervisor(tmp_path, echo=broken_echo) as sup:
        managed = sup.start("chatty", _python(chatty))
        assert managed.popen.wait(timeout=60) == 0
        managed.reader.join(timeout=30)
    log = (tmp_path / "chatty.log").read_text()
    assert "line 19999" in log and "echo stopped (BrokenPipeError" in log


def test_cli_json_reads_stdout_only_and_reports_flower_errors(tmp_path):
    noisy = ("import sys; print('INFO {\"not\": \"it\"}', file=sys.stderr, flush=True); "
             "print('{\"success\": true, \"run-id\": 7}')")
    failing = ("import sys; print('log line', file=sys.stderr); "
               "print('{\"success\": false, \"error-message\": \"SuperLink unavailable\"}');"
               " sys.exit(1)")
    with Supervisor(tmp_path, echo=None) as sup:
        assert cli_json(sup.run("noisy", _python(noisy), timeout=60)) == {"success": True,
                                                                          "run-id": 7}
        with pytest.raises(DeploymentError, match=r"`failing` failed \(exit code 1\): "
                                                  "SuperLink unavailable"):
            cli_json(sup.run("failing", _python(failing), timeout=60))
        with pytest.raises(DeploymentError, match="no JSON here"):
            cli_json(sup.run("crash", _python("import sys; sys.exit('no JSON here')"), 60))
    assert "INFO" in (tmp_path / "noisy.log").read_text()  # stderr still goes to the log


SERVE = """
import socket, sys, time
server = socket.socket()
server.bind(("127.0.0.1", int(sys.argv[1])))
server.listen()
time.sleep(600)
"""


def test_a_process_that_loses_its_port_starts_again_on_a_fresh_one(tmp_path, monkeypatch):
    fresh = launch.free_port
    with socket.socket() as thief:
        thief.bind(("127.0.0.1", 0))
        thief.listen()  # takes the port between free_port() and the server's bind
        ports = iter([thief.getsockname()[1]])
        monkeypatch.setattr(launch, "free_port", lambda: next(ports, None) or fresh())
        with Supervisor(tmp_path, echo=None) as sup:
            server, port = start_listening(sup, "server", lambda p: _python(SERVE, str(p)))
            first = sup.started[0]
            assert first.poll() == 1 and "address already in use" in first.log_text().lower()
            assert port != thief.getsockname()[1] and listens(server.process, port)


def test_a_process_that_fails_otherwise_is_not_started_again(tmp_path):
    with Supervisor(tmp_path, echo=None) as sup:
        with pytest.raises(DeploymentError, match="server exited with code 3"):
            start_listening(sup, "server", lambda port: _python("import sys; sys.exit(3)"))
        assert len(sup.started) == 1


def test_a_broken_log_stream_is_not_reported_as_the_run_ending(prepared, tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'app'\n")
    monkeypatch.setattr(commands, "run_app", lambda *args, **kwargs: _python(
        "print('{\"success\": true, \"run-id\": 7}')"))
    monkeypatch.setattr(commands, "stream_logs", lambda *args: _python(
        "import sys; sys.exit('connection to the SuperLink lost')"))
    monkeypatch.setattr(commands, "list_run", lambda *args: _python(
        "print('{\"runs\": [{\"status\": \"finished:failed\"}]}')"))
    with Supervisor(tmp_path / "logs", echo=None) as sup:
        local = LocalDeployment(prepared, sup, tmp_path / "state")
        with pytest.raises(DeploymentError, match="streaming the log of run 7 failed"):
            local.run_app(tmp_path, local.run_config(tmp_path / "out"), timeout=60)


def test_launcher_stops_every_process_on_ctrl_c(prepared):
    """The real CLI: SuperLink and SuperNodes up, then SIGINT; nothing it started survives.
    Its folder and logs are private (an existing `launch/` left mode 755 is made 700)."""
    (prepared.root / "launch").mkdir(exist_ok=True)
    (prepared.root / "launch").chmod(0o755)
    launcher = subprocess.Popen([sys.executable, "-m", "deploy.launch", "--dir",
                                 str(prepared.root)],
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
        assert launcher.returncode == 130, output
        assert "every process was stopped" in output
        # by default the components' logs stay in their files, off the console
        assert "[superlink]" not in output and "[node-0]" not in output, output
        alive = living(seen.values())
        assert not alive, [_cmdline(proc) for proc in alive]
        launch_dir = prepared.root / "launch"
        logs = list((launch_dir / "logs").iterdir())
        assert {"superlink.log", "node-0.log"} <= {log.name for log in logs}
        for path in [launch_dir, launch_dir / "logs", *logs]:
            assert path.stat().st_mode & 0o777 == (0o700 if path.is_dir() else 0o600), path
    finally:
        _stop_everything(launcher, seen.values())


@pytest.mark.slow
def test_ctrl_c_in_the_middle_of_a_round_stops_everything_without_tracebacks(prepared,
                                                                              tmp_path):
    """SIGINT while the nodes' executors and their warm ClientApps are busy: each process is
    signalled once, in order (executors, SuperNodes, SuperLink), so no log holds a traceback
    (`KeyboardInterrupt`, Flower's `OSError: Signal 15`)."""
    log_dir = prepared.root / "launch" / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    launcher = subprocess.Popen([sys.executable, "-m", "deploy.launch", "--dir",
                                 str(prepared.root), "--out", str(tmp_path / "out"),
                                 "--run-config", "num-server-rounds=50"],
                                cwd=Path(__file__).resolve().parents[1],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[int, psutil.Process] = {}

    def training() -> bool:
        assert launcher.poll() is None, launcher.stdout.read()
        for proc in psutil.Process(launcher.pid).children(recursive=True):
            seen.setdefault(proc.pid, proc)
        run_log = log_dir / "run.log"
        return run_log.is_file() and "round   1" in run_log.read_text(errors="replace")

    try:
        _wait_for(training, timeout=600)
        launcher.send_signal(signal.SIGINT)
        output, _ = launcher.communicate(timeout=120)
        assert launcher.returncode == 130, output
        assert not living(seen.values())
        logs = {path.name: path.read_text(errors="replace") for path in log_dir.iterdir()}
        for name, text in logs.items():
            for marker in ("Traceback", "KeyboardInterrupt", "Signal 15", "race condition"):
                assert marker not in text, f"{name}: {text[-3000:]}"
        assert "Traceback" not in output, output
    finally:
        _stop_everything(launcher, seen.values())


def _stop_everything(launcher: subprocess.Popen, seen) -> None:
    """Whatever went wrong: let the launcher stop its processes, then kill every one left
    (their own sessions outlive the launcher)."""
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGINT)
        try:
            launcher.wait(timeout=60)
        except subprocess.TimeoutExpired:
            launcher.kill()
            launcher.wait()
    for proc in living(seen):
        try:
            proc.kill()
        except psutil.Error:
            pass


@pytest.mark.parametrize("stopped, status, code", [
    ("num-server-rounds", COMPLETED, 0), ("no-client-updates", COMPLETED, 1),
    ("num-server-rounds", "finished:failed", 1)])
def test_launcher_report_prints_the_summary_and_sets_the_exit_code(tmp_path, capsys, stopped,
                                                                    status, code):
    history = {"stopped": stopped, "rounds": [
        {"round": 0, "seconds": 0.0, "centralized": {"loss": 2.3, "accuracy": 0.1}},
        {"round": 1, "seconds": 1.5, "centralized": {"loss": 0.4, "accuracy": 0.875},
         "fit": {"num_clients": 2, "num_failures": 1, "num_rejected": 0,
                 "failures": [{"client": "123", "error": "ValueError: boom"}]}}]}
    (tmp_path / "history.json").write_text(json.dumps(history))
    outcome = RunOutcome(run_id=7, status=status, out_dir=tmp_path, history=history)
    assert report(outcome, {"node-1": 123}, seconds=42.0) == code
    out = capsys.readouterr().out
    assert "run 7:" in out and "node-1 (node id 123) failed: ValueError: boom" in out
    assert "0.8750" in out and "wall time 42.0 s" in out


def test_prepare_refuses_a_config_the_nodes_cannot_run_before_writing_anything(tmp_path):
    with pytest.raises(ConfigError, match="'min-available-clients' \\(5\\)"):
        prepare(tmp_path / "dep", 2, "min-available-clients=5 min-fit-clients=2", HOSTS)
    assert not (tmp_path / "dep").exists()


def _handed_over_keys(tmp_path: Path, num_nodes: int) -> tuple[Path, list[Path]]:
    """Each node's key pair made on "its machine" (node-1's by ssh-keygen when installed),
    and a folder with only the public keys `node-i.pub` handed over; the private keys."""
    handed = tmp_path / "handed"
    handed.mkdir()
    private_keys = []
    for i in range(num_nodes):
        key = tmp_path / f"machine-{i}" / "keys" / f"node-{i}"
        if i == 1 and shutil.which("ssh-keygen"):
            key.parent.mkdir(parents=True)
            subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "",
                            "-f", str(key)], check=True)
        else:
            node_key.make_key_pair(key.parent, key.name)
        shutil.copy(key.with_name(key.name + ".pub"), handed / f"node-{i}.pub")
        private_keys.append(key)
    return handed, private_keys


def _public_numbers(path: Path) -> ec.EllipticCurvePublicNumbers:
    return serialization.load_ssh_public_key(path.read_bytes()).public_numbers()


def test_prepare_with_node_public_keys_writes_no_private_key(tmp_path, capsys):
    """Over a trial folder (--force): the trial's private keys go, the handed-over public
    keys are the ones registered, and the SuperNodes are told to use their own keys."""
    out = tmp_path / "dep"
    prepare(out, 2, "", HOSTS)  # a one-machine trial first: private keys in keys/
    handed, private_keys = _handed_over_keys(tmp_path, 2)
    assert prepare_main(["--out", str(out), "--num-nodes", "2", "--force",
                         "--node-public-keys", str(handed)]) == 0
    printed = capsys.readouterr().out
    assert sorted(path.name for path in (out / "keys").iterdir()) == ["node-0.pub",
                                                                        "node-1.pub"]
    for path in out.rglob("*"):
        assert not path.is_file() or b"OPENSSH PRIVATE KEY" not in path.read_bytes(), path
    manifest = json.loads((out / "deployment.json").read_text())
    assert [(n["key"], n["private_key_held_by"]) for n in manifest["nodes"]] == [
        (None, "node")] * 2
    dep = Deployment.load(out)
    assert [node.key for node in dep.nodes] == [None, None]
    lines = [line for line in printed.splitlines() if line and not line.startswith("#")]
    registered = [Path(_args_after(line, "flwr")[2]) for line in lines
                  if "flwr supernode register" in line]
    assert registered == [node.public_key for node in dep.nodes]
    for i, path in enumerate(registered):
        assert _public_numbers(path) == _public_numbers(handed / f"node-{i}.pub")
        assert path.stat().st_mode & 0o777 == 0o600
    starts = [_parse_args_run_supernode().parse_args(_args_after(line, "flower-supernode"))
              for line in lines if "flower-supernode" in line]
    assert [args.auth_supernode_private_key for args in starts] == ["keys/node-0",
                                                                    "keys/node-1"]
    assert "own machine" in printed
    assert "deploy.launch" not in printed  # it cannot start nodes whose keys it lacks
    fingerprints = [line for line in printed.splitlines() if "SHA256:" in line]
    assert len(fingerprints) == 2
    for key, line in zip(private_keys, fingerprints):
        assert pki.fingerprint(serialization.load_ssh_private_key(
            key.read_bytes(), None).public_key()) in line


def test_trial_instructions_tell_real_nodes_to_make_their_own_keys(prepared):
    text = instructions(prepared)
    assert "--node-public-keys" in text and "ssh-keygen -t ecdsa -b 384" in text


def _p256_public_key(path: Path) -> None:
    path.write_bytes(pki.openssh_public_key(ec.generate_private_key(ec.SECP256R1())
                                            .public_key()))


def _rsa_public_key(path: Path) -> None:
    path.write_bytes(rsa.generate_private_key(65537, 2048).public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))


@pytest.mark.parametrize("spoil, message", [
    (Path.unlink, "not found"),
    (lambda path: path.write_text("ecdsa-sha2-nistp384 AAAAnot-base64 node-1\n"),
     "not an OpenSSH public key"),
    (_p256_public_key, "not an ECDSA P-384 public key but ECDSA secp256r1"),
    (_rsa_public_key, "not an ECDSA P-384 public key but RSA"),
    (lambda path: path.write_bytes(path.with_name("node-0.pub").read_bytes()),
     "same key as"),
    (lambda path: shutil.copy(path.parents[1] / "machine-1" / "keys" / "node-1", path),
     "holds a private key"),
])
def test_a_missing_or_unusable_node_public_key_is_named(tmp_path, capsys, spoil, message):
    handed, _ = _handed_over_keys(tmp_path, 2)
    spoil(handed / "node-1.pub")
    out = tmp_path / "dep"
    assert prepare_main(["--out", str(out), "--num-nodes", "2",
                         "--node-public-keys", str(handed)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{handed / 'node-1.pub'}" in err and message in err
    assert not out.exists()  # refused before anything was written


def test_node_key_helper_makes_a_private_key_and_a_loadable_public_key(tmp_path, capsys,
                                                                       monkeypatch):
    """The private key is mode 600 from its creation (no chmod), in a new mode-700 folder."""
    monkeypatch.setattr(os, "chmod", lambda *args, **kwargs: None)
    monkeypatch.setattr(Path, "chmod", lambda *args, **kwargs: None)
    previous = os.umask(0o022)
    try:
        assert node_key.main(["--out", str(tmp_path / "keys"), "--name", "node-3"]) == 0
    finally:
        os.umask(previous)
    private, public = tmp_path / "keys" / "node-3", tmp_path / "keys" / "node-3.pub"
    assert private.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "keys").stat().st_mode & 0o777 == 0o700
    key = serialization.load_ssh_private_key(private.read_bytes(), None)
    assert key.curve.name == "secp384r1"
    assert pki.read_node_public_key(public).public_numbers() == key.public_key().public_numbers()
    printed = capsys.readouterr().out
    assert f"Public key to hand over: {public}" in printed
    assert pki.fingerprint(key.public_key()) in printed
    before = private.read_bytes()
    assert node_key.main(["--out", str(tmp_path / "keys"), "--name", "node-3"]) == 2
    assert "already exists" in capsys.readouterr().err and private.read_bytes() == before


def test_launch_names_the_node_whose_private_key_it_lacks(tmp_path, capsys):
    handed, _ = _handed_over_keys(tmp_path, 2)
    dep = prepare(tmp_path / "dep", 2, "", HOSTS, node_public_keys=handed)
    assert launch.main(["--dir", str(dep.root)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: node-0's private key is held by the node")
    assert not (dep.root / "launch").exists()  # refused before starting anything


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.unlink(), "does not exist"),
    (lambda path: path.write_bytes(path.read_bytes()[:100]), "unreadable"),
])
def test_launch_reads_every_nodes_data_file_before_starting_anything(tmp_path, capsys, damage,
                                                                     message):
    dep = prepare(tmp_path / "dep", 3, "", HOSTS)
    launch.check_node_data(dep, Path(__file__).resolve().parents[1])  # the prepared files fit
    damage(dep.nodes[1].data)
    assert launch.main(["--dir", str(dep.root)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: node-1: data file {dep.nodes[1].data}") and message in err
    assert not (dep.root / "launch").exists()  # refused before starting anything


def _deprecated_flags(parser) -> set[str]:
    """The flags of one of Flower's parsers that Flower marks deprecated (in their help, or
    handled by one of its deprecation actions)."""
    return {flag for action in parser._actions for flag in action.option_strings
            if "deprecated" in (action.help or "").lower()
            or "Deprecated" in type(action).__name__}


def test_printed_commands_use_no_flag_flower_deprecates(prepared):
    """flwr 1.42 deprecates `--fleet-api-type`, `--auth-supernode-public-key`, the
    `--appio-ssl-*` names and more: no printed command uses one."""
    deprecated = (_deprecated_flags(_parse_args_run_superlink())
                  | _deprecated_flags(_parse_args_run_supernode()))
    assert {"--fleet-api-type", "--auth-supernode-public-key"} <= deprecated, deprecated
    for line in instructions(prepared).splitlines():
        if line.startswith("#"):
            continue
        used = {arg.split("=")[0] for arg in shlex.split(line) if arg.startswith("--")}
        assert not used & deprecated, line


def test_the_launch_fuses_evaluation_except_under_fedbuff():
    assert commands.fused_run_config("", "num-server-rounds=3") == "fuse-evaluate=true"
    assert commands.fused_run_config("server-loop='fedbuff'", "num-server-rounds=3") == ""
    assert commands.fused_run_config("server-loop='fedbuff'", "server-loop='sync'") == \
        "fuse-evaluate=true"
