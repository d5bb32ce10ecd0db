"""A node's long-lived worker (`fl_app.app.worker`) and the ClientApp's proxy to it.

Real worker processes on Unix sockets: results equal the in-process client's, only
holders of the key get in, the files are private, a crashed or hung worker fails one
message naming the node and the next message starts a fresh one, and the worker exits
with its parent.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import numpy as np
import pytest

from fl_app.app.local_client import client_for
from fl_app.app.worker import main as worker_main
from fl_app.app.worker_link import (
    PROTOCOL,
    WorkerAddress,
    WorkerClient,
    WorkerError,
    private_dir,
)
from fl_app.data.sources import data_source
from fl_app.data.types import DataError
from fl_app.wire import round_config
from tests.conftest import make_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
ROOT = Path(__file__).resolve().parent.parent
RAW = {"optimizer": "adam", "learning-rate": 0.01, "local-epochs": 2}
PARTITION = {"partition-id": 3, "num-partitions": 10}


def _short_dir() -> Path:
    """A folder with a short path (Unix socket paths are limited to ~107 bytes), removed
    when the tests end."""
    folder = Path(tempfile.mkdtemp(prefix="flw-", dir="/tmp"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def start_worker(address: WorkerAddress, parent_pid: int | None = None,
                 timeout: float = 120.0) -> subprocess.Popen:
    argv = address.command(parent_pid or os.getpid())
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
        try:
            address.connect().close()
            return proc
        except (OSError, EOFError, WorkerError):
            assert proc.poll() is None, f"worker exited with {proc.poll()}"
            assert time.monotonic() < deadline, "worker did not start listening"
            time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker():
    address = WorkerAddress(_short_dir() / "w.sock", timeout=120.0, autostart=False)
    proc = start_worker(address)
    yield address, proc
    _stop(proc)
    assert not address.socket.exists()  # SIGTERM: it removed its socket


def test_client_app_imports_no_tensorflow():
    code = ("import sys, fl_app.app.client_app; "
            "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _max_diff(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


@pytest.mark.parametrize("source", ["partition", "node-file"])
def test_worker_results_equal_the_in_process_client(worker, source, tmp_path):
    address, _ = worker
    cfg = make_config(**{k.replace("-", "_"): v for k, v in RAW.items()})
    if source == "partition":
        node_config = dict(PARTITION)
    else:
        split = data_source(cfg).partition(1, 3)
        path = tmp_path / "node.npz"
        np.savez(path, x=split.x, y=split.y)
        node_config = {"data-path": str(path)}
    local = client_for(cfg, node_config)
    weights = [w.copy() for w in local.trainer.get_weights()]
    remote = WorkerClient(address, RAW, node_config, "node 42")
    fit_config = round_config(cfg, server_round=2)

    assert remote.get_properties({}) == local.get_properties({})
    assert [w.shape for w in remote.get_parameters({})] == [w.shape for w in weights]
    local_fit = local.fit(weights, fit_config)
    for _ in range(2):  # the second call runs on the worker's cached data and trainer
        remote_fit = remote.fit(weights, fit_config)
        assert remote_fit[1] == local_fit[1]
        assert _max_diff(remote_fit[0], local_fit[0]) < 1e-6
        assert remote_fit[2].keys() == local_fit[2].keys()
    loss, n, metrics = remote.evaluate(local_fit[0], {})
    local_loss, local_n, local_metrics = local.evaluate(local_fit[0], {})
    assert n == local_n and loss == pytest.approx(local_loss, abs=1e-6)
    assert metrics == pytest.approx(local_metrics, abs=1e-6)


def test_a_data_error_inside_the_worker_names_the_node(worker):
    address, _ = worker
    remote = WorkerClient(address, RAW, {"data-path": "/nonexistent/node.npz"}, "node 42")
    with pytest.raises(DataError, match="^node 42: data file /nonexistent/node.npz"):
        remote.get_properties({})
    assert remote.__class__(address, RAW, PARTITION, "node 42").get_properties({})


def test_a_shared_folder_is_refused_not_changed_and_a_non_socket_is_left_alone(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    with pytest.raises(WorkerError, match="open to other accounts"):
        private_dir(shared)
    assert shared.stat().st_mode & 0o777 == 0o755  # the user's folder keeps its mode
    folder = _short_dir()
    not_a_socket = folder / "w.sock"
    not_a_socket.write_text("the user's notes")
    assert worker_main(["--socket", str(not_a_socket)]) == 1
    assert not_a_socket.read_text() == "the user's notes"


def test_worker_files_are_private(worker):
    address, _ = worker
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(address.socket.parent) == 0o700
    for path in (address.socket, address.authkey_file, address.pid_file, address.log_file):
        assert mode(path) == 0o600, path


def test_a_wrong_key_is_refused(worker):
    address, _ = worker
    with pytest.raises(AuthenticationError):
        Client(str(address.socket), family="AF_UNIX", authkey=b"0" * 64)
    assert WorkerClient(address, RAW, PARTITION, "node 1").get_properties({})
    assert "refused a connection" in address.log_file.read_text()


def test_a_key_file_others_can_read_is_refused(tmp_path):
    key = tmp_path / "key"
    key.write_text("k" * 64)
    key.chmod(0o644)
    address = WorkerAddress(_short_dir() / "w.sock", key, autostart=False)
    with pytest.raises(WorkerError, match="mode 644"):
        address.connect()


def test_without_a_worker_and_no_autostart_the_message_fails_naming_the_node():
    address = WorkerAddress(_short_dir() / "w.sock", autostart=False)
    with pytest.raises(WorkerError, match=f"node 9: worker at {address.socket}"):
        WorkerClient(address, RAW, PARTITION, "node 9").get_properties({})


def _slow_fit(remote: WorkerClient, weights, errors: list) -> None:
    try:
        remote.fit(weights, {"local-epochs": 100_000})  # far longer than the test waits
    except WorkerError as err:
        errors.append(err)


def _weights() -> list[np.ndarray]:
    cfg = make_config(**{k.replace("-", "_"): v for k, v in RAW.items()})
    return [w.copy() for w in client_for(cfg, PARTITION).trainer.get_weights()]


def test_a_crashed_worker_fails_that_message_and_the_next_starts_a_fresh_one():
    address = WorkerAddress(_short_dir() / "w.sock", timeout=120.0)  # autostart on
    remote = WorkerClient(address, RAW, PARTITION, "node 5")
    try:
        assert remote.get_properties({})  # the first message starts the worker
        first = address.worker_pid()
        assert first is not None
        errors: list = []
        call = threading.Thread(target=_slow_fit, args=(remote, _weights(), errors))
        call.start()
        time.sleep(1.5)
        os.kill(first, signal.SIGKILL)
        call.join(timeout=60)
        assert len(errors) == 1
        assert "node 5" in str(errors[0]) and str(address.socket) in str(errors[0])
        assert remote.get_properties({})  # the next message starts a fresh worker
        second = address.worker_pid()
        assert second is not None and second != first
    finally:
        pid = address.worker_pid()
        if pid:
            os.kill(pid, signal.SIGTERM)


def test_a_hung_worker_is_stopped_and_the_next_message_starts_a_fresh_one():
    address = WorkerAddress(_short_dir() / "w.sock", timeout=120.0)
    remote = WorkerClient(address, RAW, PARTITION, "node 6")
    try:
        assert remote.get_properties({})
        first = address.worker_pid()
        impatient = WorkerClient(WorkerAddress(address.socket, timeout=1.0), RAW, PARTITION,
                                 "node 6")
        with pytest.raises(WorkerError, match="node 6.*did not answer fit within 1 s"):
            impatient.fit(_weights(), {"local-epochs": 400})
        assert address.worker_pid() is None  # it was killed
        assert remote.get_properties({})
        assert address.worker_pid() not in (None, first)
    finally:
        pid = address.worker_pid()
        if pid:
            os.kill(pid, signal.SIGTERM)


def test_the_worker_exits_when_its_parent_does():
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    address = WorkerAddress(_short_dir() / "w.sock", autostart=False)
    proc = start_worker(address, parent_pid=parent.pid)
    try:
        parent.kill()
        parent.wait()
        proc.wait(timeout=30)
        assert not address.socket.exists()
        assert "parent process" in address.log_file.read_text()
    finally:
        _stop(proc)
        parent.kill()


def test_the_workers_data_cache_is_bounded_and_keyed_by_run():
    from fl_app.app.worker import DATA_RUNS, Worker

    server = Worker(b"k" * 64, log=lambda line: None)
    for run_id in range(DATA_RUNS + 2):  # equal run configs: the run id tells them apart
        request = {"protocol": PROTOCOL, "method": "get_properties", "run_id": run_id,
                   "run_config": {"seed": 1}, "node_config": PARTITION, "parameters": None,
                   "config": {}}
        assert server.handle(request)
        assert [key[0] for key in server.data][-1] == run_id
    assert len(server.data) == DATA_RUNS
    # the models of runs whose data was dropped are dropped too (rebuilt if they return)
    from fl_app.ml.trainer import cached_trainer

    assert cached_trainer.cache_info().currsize <= DATA_RUNS


def test_a_key_file_another_account_owns_or_a_symlinked_key_is_refused(tmp_path, monkeypatch):
    from fl_app.app import worker_link

    folder = worker_link.private_dir(tmp_path / "w")
    key = folder / "authkey"
    assert len(worker_link.ensure_authkey(key)) == 64 and not list(folder.glob(".authkey.*"))
    monkeypatch.setattr(worker_link.os, "geteuid", lambda: os.getuid() + 1)
    with pytest.raises(worker_link.WorkerError, match="belongs to uid"):
        worker_link.read_authkey(key)
    monkeypatch.undo()
    (folder / "link").symlink_to(key)
    with pytest.raises(OSError):
        worker_link.read_authkey(folder / "link")


def test_a_later_run_or_another_client_never_gets_a_fit_s_weights(worker):
    address, _ = worker
    cfg = make_config(**{k.replace("-", "_"): v for k, v in RAW.items()})
    initial = WorkerClient(address, RAW, PARTITION, "node 1", run_id=11).get_parameters({})
    sent = [w + 0.01 for w in initial]
    trained, _, _ = WorkerClient(address, RAW, PARTITION, "node 1", run_id=11).fit(
        sent, round_config(cfg, server_round=1))
    assert _max_diff(trained, sent) > 0
    other = {"partition-id": 4, "num-partitions": 10}
    for node_config, run_id in ((other, 11), (PARTITION, 12)):  # another client; a later run
        handed = WorkerClient(address, RAW, node_config, "node 2", run_id).get_parameters({})
        assert _max_diff(handed, trained) > 0 and _max_diff(handed, sent) > 0
        assert _max_diff(handed, initial) == 0


def test_a_silent_connection_does_not_block_an_honest_client(worker):
    from fl_app.app.worker import CHALLENGE_TIMEOUT

    address, _ = worker
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(address.socket))  # never answers the key challenge
    try:
        answers: list = []
        honest = threading.Thread(target=lambda: answers.append(
            WorkerClient(address, RAW, PARTITION, "node 3").get_properties({})))
        honest.start()
        honest.join(timeout=CHALLENGE_TIMEOUT / 2)
        assert answers, "an honest call waited behind a silent connection"
        silent.settimeout(CHALLENGE_TIMEOUT + 20)
        start = time.monotonic()
        while silent.recv(4096):  # the challenge, then the worker hangs up
            pass
        assert time.monotonic() - start < CHALLENGE_TIMEOUT + 5
        deadline = time.monotonic() + 10  # the worker's thread logs once it hung up
        while "did not answer the key challenge within" not in address.log_file.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        silent.close()


def test_a_request_longer_than_the_limit_gets_an_error_not_a_crash(worker):
    from fl_app.app.worker_link import MAX_REQUEST_BYTES, read_authkey

    address, _ = worker
    conn = Client(str(address.socket), family="AF_UNIX",
                  authkey=read_authkey(address.authkey_file))
    with conn:  # the header of a message of 1 TB (the long form), and no body
        os.write(conn.fileno(), struct.pack("!i", -1) + struct.pack("!Q", 10**12))
        assert conn.poll(30)
        reply = conn.recv()
    assert not reply["ok"] and f"({MAX_REQUEST_BYTES} bytes)" in reply["error"]
    assert WorkerClient(address, RAW, PARTITION, "node 4").get_properties({})


def test_a_worker_with_another_key_leaves_a_live_socket_alone(worker, tmp_path):
    address, _ = worker
    other = WorkerAddress(address.socket, tmp_path / "other.key")
    proc = subprocess.Popen(other.command(os.getpid()), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 1 and "did not pass the key challenge" in stderr
    assert address.socket.is_socket()
    assert WorkerClient(address, RAW, PARTITION, "node 5").get_properties({})


def test_an_old_worker_exiting_leaves_its_successors_socket_in_place():
    address = WorkerAddress(_short_dir() / "w.sock", timeout=120.0, autostart=False)
    old = start_worker(address)
    try:
        address.socket.unlink()  # e.g. an operator's clean-up: the old worker is orphaned
        new = start_worker(address)
        try:
            _stop(old)  # it exits, cleaning up what it made
            assert address.socket.is_socket() and address.worker_pid() == new.pid
            assert WorkerClient(address, RAW, PARTITION, "node 6").get_properties({})
            assert "unless another worker has taken it over" in address.log_file.read_text()
        finally:
            _stop(new)
        assert not address.socket.exists() and not address.pid_file.exists()
    finally:
        _stop(old)


def test_every_socket_has_its_own_key_file():
    folder = _short_dir()
    sockets = [folder / name for name in ("a.sock", "a.other", "a", "a.key")]
    keys = [WorkerAddress(path).authkey_file for path in sockets]
    assert len(set(keys)) == len(keys)  # with_suffix gave a.key for the first three
    assert all(key != path for key, path in zip(keys, sockets))  # and a.key for "a.key"
    assert keys[0] == folder / "a.sock.key"


@pytest.mark.parametrize("which", ["log_file", "pid_file"])
def test_a_symlinked_pid_or_log_file_is_refused(which):
    address = WorkerAddress(_short_dir() / "w.sock")
    target = address.socket.parent / "target"
    target.write_text("the user's file")
    getattr(address, which).symlink_to(target)
    proc = subprocess.Popen(address.command(os.getpid()), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:  # (following the link, it would run on: it gives up at once)
        _, stderr = proc.communicate(timeout=60)
    finally:
        _stop(proc)
    assert proc.returncode == 1 and "is a symlink" in stderr
    assert target.read_text() == "the user's file"
    assert not address.socket.exists()  # a worker that gave up removed its own socket


def test_a_request_that_does_not_unpickle_fails_alone_and_is_logged(worker):
    from fl_app.app.worker_link import read_authkey

    address, _ = worker
    with Client(str(address.socket), family="AF_UNIX",
                authkey=read_authkey(address.authkey_file)) as conn:
        conn.send_bytes(b"not a pickle")
        with pytest.raises(EOFError):
            conn.recv()
    assert "a connection failed: UnpicklingError" in address.log_file.read_text()
    assert WorkerClient(address, RAW, PARTITION, "node 7").get_properties({})
