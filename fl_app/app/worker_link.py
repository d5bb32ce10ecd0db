"""The ClientApp's side of the node's long-lived worker: find it (or start it), forward a call.

Flower's SuperNode starts a fresh ClientApp process for every message; the worker
(`fl_app.app.worker`) is one process per node that keeps TensorFlow imported, the node's data
loaded and validated, and the model with its compiled loops built across messages and runs.
This module imports no TensorFlow: a ClientApp that forwards to a worker starts in the time
it takes to import Flower.

A node uses a worker when its node config names one (`--node-config "... worker-socket='PATH'
worker-authkey-file='FILE'"`); without `worker-socket` the ClientApp trains in-process, as in
simulation. The worker listens on a Unix socket (`PATH`, mode 600) in a mode-700 folder,
and every connection must answer an HMAC challenge with the key in `FILE` (mode 600;
default `PATH.key`, one key per socket): nothing on the network reaches it, and on the node
only the account that runs the SuperNode does; another local account can neither connect
nor read the key.

A worker that is not running when a message arrives is started here (detached, watching the
SuperNode's pid: it exits when the SuperNode stops), unless `worker-autostart=false`. A worker
that crashed, or did not answer within `worker-timeout` seconds (it is then killed), fails
that one message with an error naming the node and the socket; the next message starts a
fresh one.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pickle
import secrets
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from contextlib import contextmanager
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client as connect
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Iterator

from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar

KEY_SOCKET = "worker-socket"
KEY_AUTHKEY = "worker-authkey-file"
KEY_TIMEOUT = "worker-timeout"
KEY_AUTOSTART = "worker-autostart"
WORKER_KEYS = (KEY_SOCKET, KEY_AUTHKEY, KEY_TIMEOUT, KEY_AUTOSTART)
DEFAULT_TIMEOUT = 300.0
START_TIMEOUT = 120.0
PROTOCOL = 2  # bumped whenever a request or reply changes shape
# the largest request a worker reads: Flower's largest message (2 GiB, its gRPC limit) of
# parameters, plus room for the configs and pickling
MAX_REQUEST_BYTES = 2**31 + 2**26
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes on Linux
SUPERNODE = "flower-supernode"
# nothing listens (no socket file, or a stale one), or the worker died as we connected
NOT_LISTENING = (FileNotFoundError, ConnectionError, EOFError)


class WorkerError(RuntimeError):
    """The worker could not be reached, crashed, hung, or the call failed inside it."""


# --- private files, without importing the deploy tooling (a higher layer)
def _refuse_foreign(path: Path, info: os.stat_result) -> None:
    """Refuse a worker file or folder that another account owns (it could know the key)."""
    if info.st_uid != os.geteuid():
        raise WorkerError(f"{path} belongs to uid {info.st_uid}, not to this account "
                          f"({os.geteuid()}): remove it or choose another worker-socket")


def private_dir(path: Path) -> Path:
    """`path` as a folder of mode 700 that this account owns and that is not a symlink:
    created (parents too) if missing; an existing folder open to other accounts is refused,
    not changed (it may be the user's home or another shared folder)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        raise WorkerError(f"worker folder {path} is a symlink: use a real folder")
    _refuse_foreign(path, info)
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise WorkerError(f"worker folder {path} (mode {stat.S_IMODE(info.st_mode):o}) is open "
                          "to other accounts: put worker-socket in a folder of its own (it is "
                          "created with mode 700)")
    return path


def open_private(path: Path, flags: int) -> int:
    """A file descriptor on `path` (created mode 600 if missing, never through a symlink,
    refused if another account owns it), opened with `flags` added to `O_CREAT`."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as err:
        why = "it is a symlink (never followed): remove it" if err.errno == errno.ELOOP \
            else err.strerror
        raise WorkerError(f"cannot open worker file {path}: {why}") from err
    try:
        _refuse_foreign(path, os.fstat(fd))
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_authkey(path: Path) -> bytes:
    """The key in `path`; a new random one if there is none, written whole to a mode-600
    temporary file and linked into place (a crash never leaves an empty key behind)."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(secrets.token_hex(32))
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # another message made it first: read that one
    finally:
        os.unlink(tmp)
    return read_authkey(path)


def read_authkey(path: Path) -> bytes:
    """The key in `path`; refused if others than its owner may read or write the file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        _refuse_foreign(path, info)
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise WorkerError(f"worker key file {path} has mode {mode:03o}: it must be "
                              "readable by its owner only (chmod 600)")
        key = file.read().strip()
    if len(key) < 32:
        raise WorkerError(f"worker key file {path} holds no key (at least 32 characters)")
    return key


# --- where the worker is
class WorkerAddress:
    """A node's worker: its socket, key file, call timeout and whether it may be started here."""

    def __init__(self, socket: str | Path, authkey_file: str | Path | None = None,
                 timeout: float = DEFAULT_TIMEOUT, autostart: bool = True) -> None:
        self.socket = Path(socket).expanduser().absolute()
        self.authkey_file = (Path(authkey_file).expanduser().absolute() if authkey_file
                             else self._beside(".key"))
        self.timeout = float(timeout)
        self.autostart = autostart
        if len(os.fsencode(self.socket)) > MAX_SOCKET_PATH:
            raise WorkerError(f"worker socket path {self.socket} is longer than "
                              f"{MAX_SOCKET_PATH} bytes (a Unix socket limit): choose a "
                              "shorter one")

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Scalar]) -> WorkerAddress | None:
        """The worker named in `node_config`, or None (train in-process)."""
        if not node_config.get(KEY_SOCKET):
            return None
        autostart = node_config.get(KEY_AUTOSTART, True)
        if isinstance(autostart, str):
            autostart = autostart.lower() not in ("false", "0", "no")
        return cls(str(node_config[KEY_SOCKET]), node_config.get(KEY_AUTHKEY) or None,
                   float(node_config.get(KEY_TIMEOUT, DEFAULT_TIMEOUT)), bool(autostart))

    def _beside(self, suffix: str) -> Path:
        """The socket's full file name plus `suffix`: every socket has its own files."""
        return self.socket.with_name(self.socket.name + suffix)

    @property
    def pid_file(self) -> Path:
        return self._beside(".pid")

    @property
    def log_file(self) -> Path:
        return self._beside(".log")

    @property
    def lock_file(self) -> Path:
        return self._beside(".lock")

    def command(self, parent_pid: int | None) -> list[str]:
        """The command line that starts this worker."""
        argv = [sys.executable, "-m", "fl_app.app.worker", "--socket", str(self.socket),
                "--authkey-file", str(self.authkey_file)]
        return argv + (["--parent-pid", str(parent_pid)] if parent_pid else [])

    def connect(self) -> Connection:
        """A connection that passed the key challenge; OSError if nobody listens."""
        return connect(str(self.socket), family="AF_UNIX",
                       authkey=read_authkey(self.authkey_file))

    def worker_pid(self) -> int | None:
        """The pid the running worker wrote, if that process still runs this worker."""
        try:
            pid = int(self.pid_file.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None
        return pid if _runs_worker(pid, self.socket) else None


def _runs_worker(pid: int, socket: Path) -> bool:
    import psutil

    try:
        cmdline = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return "fl_app.app.worker" in cmdline and str(socket) in cmdline


def supernode_pid() -> int | None:
    """The pid of the nearest ancestor process that is a `flower-supernode`, or None (an
    auto-started worker then watches the ClientApp's parent: Flower's SuperExec)."""
    import psutil

    for proc in psutil.Process().parents():
        try:
            if any(Path(arg).name == SUPERNODE for arg in proc.cmdline()[:2]):
                return proc.pid
        except psutil.Error:
            continue
    return None


@contextmanager
def _start_lock(address: WorkerAddress) -> Iterator[None]:
    """One ClientApp at a time checks for, and starts, a node's worker."""
    private_dir(address.socket.parent)
    fd = open_private(address.lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def start_worker(address: WorkerAddress, parent_pid: int | None,
                 timeout: float = START_TIMEOUT) -> subprocess.Popen:
    """Start the worker detached from this process (its own session), watching `parent_pid`;
    return once it accepts connections. It runs this very `fl_app` (the app bundle's)."""
    ensure_authkey(address.authkey_file)
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)}
    with open(os.devnull, "rb") as devnull:
        proc = subprocess.Popen(address.command(parent_pid), env=env, stdin=devnull,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, umask=0o077)
    deadline = time.monotonic() + timeout
    while True:
        try:
            address.connect().close()
            return proc
        except OSError:
            pass
        if proc.poll() is not None:
            raise WorkerError(f"the worker at {address.socket} exited with code {proc.poll()} "
                              f"while starting; see {address.log_file}")
        if time.monotonic() > deadline:
            proc.kill()
            raise WorkerError(f"the worker at {address.socket} did not start listening within "
                              f"{timeout:.0f} s; see {address.log_file}")
        time.sleep(0.1)


def open_worker(address: WorkerAddress) -> Connection:
    """A connection to the node's worker, starting one first if none listens and autostart
    is on."""
    try:
        return address.connect()
    except NOT_LISTENING:
        if not address.autostart:
            raise
    with _start_lock(address):
        try:  # another ClientApp may have started it while we waited for the lock
            return address.connect()
        except NOT_LISTENING:
            start_worker(address, supernode_pid() or os.getppid())
        return address.connect()


def kill_worker(address: WorkerAddress) -> None:
    """Kill a hung worker (the process named by its pid file, if it is still that worker)."""
    pid = address.worker_pid()
    if pid is None:
        return
    import psutil

    try:
        proc = psutil.Process(pid)
        proc.kill()
        proc.wait(timeout=10)
    except psutil.Error:
        pass  # its socket stays: the next worker finds nobody listening and replaces it


def call_worker(address: WorkerAddress, node: str, request: dict[str, Any]) -> Any:
    """Send one request to the node's worker and return its result.

    Raises `WorkerError` naming `node` and the socket if the worker cannot be reached,
    refuses this node's key, dies or does not answer within the address's timeout (then it
    is killed, so the next message starts a fresh one), or if the request is larger than
    `MAX_REQUEST_BYTES`, and re-raises an error the call hit inside the worker as a
    `WorkerError` carrying its type and message (a `DataError` as a `DataError` naming
    `node`, as the in-process ClientApp raises it).
    """
    where = f"{node}: worker at {address.socket}"
    payload = pickle.dumps({"protocol": PROTOCOL, **request}, pickle.HIGHEST_PROTOCOL)
    if len(payload) > MAX_REQUEST_BYTES:
        raise WorkerError(f"{where}: the {request['method']} request is {len(payload)} bytes, "
                          f"more than a worker reads ({MAX_REQUEST_BYTES})")
    try:
        conn = open_worker(address)
    except WorkerError as err:
        raise WorkerError(f"{node}: {err}") from err
    except AuthenticationError as err:
        raise WorkerError(f"{where} refused the key in {address.authkey_file}: a worker with "
                          "another key listens there; stop it or choose another "
                          "worker-socket") from err
    except (OSError, EOFError) as err:
        raise WorkerError(f"{where} could not be reached ({err!r})") from err
    with conn:
        try:
            conn.send_bytes(payload)
            if not conn.poll(address.timeout):
                kill_worker(address)
                raise WorkerError(f"{where} did not answer {request['method']} within "
                                  f"{address.timeout:.0f} s (worker-timeout); it was stopped, "
                                  "the next message starts a fresh one")
            reply = conn.recv()
        except (OSError, EOFError) as err:
            raise WorkerError(f"{where} failed during {request['method']} ({err!r}): it "
                              f"crashed or was stopped; see {address.log_file}") from err
    if reply.get("ok"):
        return reply["result"]
    if reply.get("type") == "DataError":  # as the in-process ClientApp reports it
        from fl_app.data.types import DataError

        raise DataError(f"{node}: {reply['message']}")
    raise WorkerError(f"{where}: {reply['error']}")


class WorkerClient(NumPyClient):
    """A NumPyClient that forwards every call to the node's worker.

    `run_config` is the run's raw config (the worker resolves it), `node_config` the node's
    (its worker keys removed), `node` the name errors use, `run_id` Flower's id of the run
    (the worker keeps each run's data and trainer apart).
    """

    def __init__(self, address: WorkerAddress, run_config: Mapping[str, Scalar],
                 node_config: Mapping[str, Scalar], node: str, run_id: int = 0) -> None:
        self.address = address
        self.run_config = dict(run_config)
        self.node_config = {k: v for k, v in node_config.items() if k not in WORKER_KEYS}
        self.node = node
        self.run_id = int(run_id)

    def _call(self, method: str, parameters: NDArrays | None,
              config: Mapping[str, Scalar]) -> Any:
        return call_worker(self.address, self.node, {
            "method": method, "run_id": self.run_id, "run_config": self.run_config,
            "node_config": self.node_config, "parameters": parameters, "config": dict(config)})

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        return self._call("get_properties", None, config)

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return self._call("get_parameters", None, config)

    def fit(self, parameters: NDArrays,
            config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        return tuple(self._call("fit", parameters, config))  # type: ignore[return-value]

    def evaluate(self, parameters: NDArrays,
                 config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        return tuple(self._call("evaluate", parameters, config))  # type: ignore[return-value]
