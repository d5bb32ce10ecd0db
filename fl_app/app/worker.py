"""A node's long-lived worker: TensorFlow, the node's data and the compiled model, kept warm.

    python -m fl_app.app.worker --socket PATH [--authkey-file FILE] [--parent-pid PID]

Flower's SuperNode starts one ClientApp process per message; with `worker-socket` in its
node config, that process (`fl_app.app.client_app`, which imports no TensorFlow) forwards the
call here (`fl_app.app.worker_link`). This process imports TensorFlow once, keeps the node's
data loaded and validated for the last `DATA_RUNS` runs, and each run's trainer
(`fl_app.ml.trainer.trainer_for`: the built model and its traced loops, back at its initial
weights after every call), and runs the `KerasClient` calls one at a time. Both caches are
keyed by Flower's run id: nothing of one run is handed to the next.

Who reaches it: it listens on the Unix socket PATH (mode 600, in a folder of mode 700) and
challenges every connection with the key in FILE (default PATH.key, one per socket; mode
600, made if missing), so another local account can neither connect nor read the key; only
the account that runs the SuperNode does. Each connection is served in its own thread: one
that does not answer the challenge within `CHALLENGE_TIMEOUT` seconds, or sends no request
within `REQUEST_WAIT`, is dropped without holding up the others, and a request longer than
`MAX_REQUEST_BYTES` is refused before it is read. It exits on SIGTERM/SIGINT/SIGHUP or when the
process PID (the SuperNode) ends, removing its socket and pid file only while they are still
the ones it made (a newer worker may have taken the path over). Its log is PATH.log.
"""

from __future__ import annotations

import argparse
import gc
import os
import pickle
import signal
import socket
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fl_app.app.worker_link import (
    MAX_REQUEST_BYTES,
    PROTOCOL,
    WorkerAddress,
    WorkerError,
    ensure_authkey,
    open_private,
    private_dir,
)
from fl_app.data.files import file_stamp
from fl_app.schema import RunConfig, Scalar

if TYPE_CHECKING:
    from fl_app.data.sources import ClientData

DATA_RUNS = 2  # runs whose node data stays loaded
CHALLENGE_TIMEOUT = 10.0  # seconds a new connection has to answer the key challenge
REQUEST_WAIT = 30.0  # seconds a connected client has to send its request
BACKLOG = 16  # connections the kernel queues until they are accepted
_Items = tuple[tuple[str, Scalar], ...]
DataKey = tuple[int, _Items, _Items, tuple[int, int, int] | None]
"""What a node's loaded data is cached by: run id, run config, node config and the data
file's stamp (`file_stamp`)."""

Log = Callable[[str], None]
FileId = tuple[int, int, int]  # device, inode and change time of a file this process made


class _Deadline:
    """Shuts `sock` down (its blocked reads end) if the `with` block outlasts `seconds`."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.sock = sock
        self.expired = False
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def _expire(self) -> None:
        self.expired = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer has gone already

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        self._timer.join()


def _error_reply(err: Exception) -> dict[str, Any]:
    """The reply to a failed call: its error's type and message."""
    return {"ok": False, "type": type(err).__name__, "error": f"{type(err).__name__}: {err}",
            "message": str(err)}


class Worker:
    """Serves `KerasClient` calls: each connection in its own thread (challenged with
    `authkey`), the calls themselves one at a time (the trainer is not thread-safe), with
    caches bounded and keyed by run."""

    def __init__(self, authkey: bytes, log: Log) -> None:
        self.authkey = authkey
        self.log = log
        self.data: OrderedDict[DataKey, ClientData] = OrderedDict()
        self.served = 0
        self.calls = threading.Lock()

    def node_data(self, run_id: int, cfg: RunConfig,
                  node_config: Mapping[str, Scalar]) -> ClientData:
        """The node's data for run `run_id` with `cfg`, from the cache (loaded on a miss)."""
        from fl_app.data.node_data import load_client
        from fl_app.ml.trainer import cached_trainer

        key = (run_id, tuple(sorted(cfg.items())), tuple(sorted(node_config.items())),
               file_stamp(str(node_config.get("data-path", ""))))
        if key in self.data:
            self.data.move_to_end(key)
        else:
            self.data[key] = load_client(cfg, node_config)
            while len(self.data) > DATA_RUNS:
                evicted, _ = self.data.popitem(last=False)
                if evicted[0] not in {k[0] for k in self.data}:
                    cached_trainer.cache_clear()  # a run gone: its model too (others rebuilt)
                gc.collect()
        return self.data[key]

    def handle(self, request: Mapping[str, Any]) -> Any:
        """Run one request's call; return its result."""
        from fl_app.app.config import resolve
        from fl_app.app.local_client import client_for

        if request.get("protocol") != PROTOCOL:
            raise WorkerError(f"the ClientApp speaks worker protocol {request.get('protocol')}, "
                              f"this worker {PROTOCOL}: restart the worker")
        cfg = resolve(request["run_config"])
        run_id, node_config = int(request["run_id"]), request["node_config"]
        # its fit metrics time data and model (`fl_app.client.timing`): near 0 once cached
        client = client_for(cfg, node_config, lambda: self.node_data(run_id, cfg, node_config),
                            run_id)
        method = request["method"]
        if method == "get_properties":
            return client.get_properties(request["config"])
        if method == "get_parameters":
            return client.get_parameters(request["config"])
        if method == "fit":
            return client.fit(request["parameters"], request["config"])
        if method == "evaluate":
            return client.evaluate(request["parameters"], request["config"])
        raise WorkerError(f"unknown method {method!r}")

    def serve_one(self, conn: Connection, sock: socket.socket) -> None:
        """Read one request from `conn` (on `sock`), answer it (the result or the error)."""
        with _Deadline(sock, REQUEST_WAIT) as deadline:
            try:
                payload = conn.recv_bytes(MAX_REQUEST_BYTES)
            except (OSError, EOFError) as err:
                if deadline.expired:
                    raise OSError(f"no request within {REQUEST_WAIT:.0f} s") from err
                # recv_bytes refuses a long message by marking the connection unreadable
                if isinstance(err, EOFError) or conn.readable:
                    raise
                self.log(f"refused a request longer than {MAX_REQUEST_BYTES} bytes")
                conn.send(_error_reply(WorkerError(
                    f"the request is longer than a worker reads ({MAX_REQUEST_BYTES} bytes)")))
                return
        request = pickle.loads(payload)
        start = time.perf_counter()
        with self.calls:
            try:
                reply = {"ok": True, "result": self.handle(request)}
            except Exception as err:  # the call fails, the worker stays
                self.log(f"{request.get('method')} failed: "
                         f"{''.join(traceback.format_exception(err)).strip()}")
                reply = _error_reply(err)
            self.served += 1
            self.log(f"{request.get('method')} served in {time.perf_counter() - start:.3f} s "
                     f"(request {self.served})")
        conn.send(reply)

    def serve_connection(self, sock: socket.socket) -> None:
        """Challenge one accepted connection, then serve its request."""
        with sock, Connection(os.dup(sock.fileno())) as conn:
            deadline = _Deadline(sock, CHALLENGE_TIMEOUT)
            try:
                with deadline:
                    deliver_challenge(conn, self.authkey)
                    answer_challenge(conn, self.authkey)
            except AuthenticationError:
                self.log("refused a connection that did not answer the key challenge")
                return
            except (OSError, EOFError) as err:
                self.log(f"dropped a connection that did not answer the key challenge within "
                         f"{CHALLENGE_TIMEOUT:.0f} s" if deadline.expired
                         else f"a connection failed before its request: {err!r}")
                return
            try:
                self.serve_one(conn, sock)
            except EOFError:  # a probe (is a worker listening?) that sent nothing
                return
            except OSError as err:  # the ClientApp went away mid-call
                self.log(f"lost a connection: {err}")
            except Exception as err:  # e.g. a request that does not unpickle: this one only
                self.log(f"a connection failed: {type(err).__name__}: {err}")

    def serve(self, server: socket.socket) -> None:
        """Accept connections until the process is told to stop, each served by a thread."""
        while True:
            try:
                sock, _ = server.accept()
            except OSError as err:  # e.g. out of file descriptors: let some close first
                self.log(f"accepting a connection failed: {err!r}")
                time.sleep(0.1)
                continue
            threading.Thread(target=self.serve_connection, args=(sock,), name="connection",
                             daemon=True).start()


def _file_id(path: Path) -> FileId | None:
    """(device, inode, ctime) of `path` itself (a symlink is not followed), or None if absent."""
    try:
        info = path.lstat()
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino, info.st_ctime_ns


def _remove_own(path: Path, made: FileId | None) -> None:
    """Remove `path` if it is still the file this process made (not a successor's)."""
    if made is not None and _file_id(path) == made:
        path.unlink(missing_ok=True)


def _path_free(address: WorkerAddress) -> bool:
    """Whether this worker may bind the socket path: True once it is free (a stale socket
    that nobody listens on is removed), False if a worker with this key already serves it.
    Raises `WorkerError` for a file that is not a socket, or when whatever listens there
    fails the key challenge: a live socket is never removed."""
    try:
        address.connect().close()
    except FileNotFoundError:
        return True
    except ConnectionRefusedError:  # nobody listens: a stale socket, or not a socket at all
        if not address.socket.is_socket():
            raise WorkerError(f"{address.socket} exists and is not a socket; leaving it be")
        address.socket.unlink()
        return True
    except (OSError, EOFError, AuthenticationError) as err:
        raise WorkerError(f"something listens on {address.socket} but did not pass the key "
                          f"challenge with {address.authkey_file} ({err!r}): another worker "
                          "with another key? Its socket is left in place: stop it or choose "
                          "another worker-socket") from err
    return False


def _bind(path: Path) -> tuple[socket.socket, FileId | None]:
    """A socket listening on `path` (mode 600) and the id of the file it made there."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    try:
        server.bind(str(path))
        os.chmod(path, 0o600)
        server.listen(BACKLOG)
    except OSError:
        server.close()
        raise
    finally:
        os.umask(old_umask)
    return server, _file_id(path)


def _watch_parent(pid: int, cleanup: Callable[[], None]) -> None:
    """Exit this process (after `cleanup`) once process `pid` has ended."""
    import psutil

    try:
        parent = psutil.Process(pid)
    except psutil.Error:
        cleanup()
        os._exit(0)

    def watch() -> None:
        while True:
            try:
                alive = parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE
            except psutil.Error:
                alive = False
            if not alive:
                cleanup(f"parent process {pid} ended")
                os._exit(0)
            time.sleep(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--authkey-file", default=None,
                        help="file with the connection key (mode 600; made if missing)")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the SuperNode) ends")
    return parser.parse_args(argv)


def _open_log(path: Path) -> Log:
    """A function writing a line to the log file `path` (mode 600, never a symlink) and to
    stderr, from any thread."""
    log_file = os.fdopen(open_private(path, os.O_WRONLY | os.O_APPEND), "a", encoding="utf-8")
    lock = threading.Lock()

    def log(message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} worker[{os.getpid()}] {message}\n"
        with lock:
            log_file.write(line)
            log_file.flush()
            print(line, end="", file=sys.stderr, flush=True)

    return log


def main(argv: list[str] | None = None) -> int:
    """Run the worker until a signal or its parent's end; the exit status."""
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    address = WorkerAddress(args.socket, args.authkey_file)
    try:
        private_dir(address.socket.parent)
        authkey = ensure_authkey(address.authkey_file)
        log = _open_log(address.log_file)
    except WorkerError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    try:
        if not _path_free(address):
            log("another worker already listens on this socket; exiting")
            return 0
        server, socket_id = _bind(address.socket)
    except WorkerError as err:
        log(f"error: {err}")
        return 1
    made: dict[Path, FileId | None] = {address.socket: socket_id}
    done = threading.Lock()

    def cleanup(reason: str = "stopping") -> None:
        if not done.acquire(blocking=False):
            return
        log(f"{reason}; removing {address.socket} unless another worker has taken it over")
        for path, file_id in made.items():
            _remove_own(path, file_id)

    try:
        with os.fdopen(open_private(address.pid_file, os.O_WRONLY | os.O_TRUNC), "w",
                       encoding="ascii") as pid_file:
            pid_file.write(str(os.getpid()))
        made[address.pid_file] = _file_id(address.pid_file)

        def on_signal(signum: int, frame: Any) -> None:
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGHUP, on_signal)
        if args.parent_pid:
            _watch_parent(args.parent_pid, cleanup)
        log(f"started: listening on {address.socket} (parent pid {args.parent_pid})")
        start = time.perf_counter()
        import fl_app.app.local_client  # noqa: F401  (TensorFlow, once per worker)

        log(f"tensorflow imported in {time.perf_counter() - start:.2f} s")
        Worker(authkey, log).serve(server)
    except WorkerError as err:
        log(f"error: {err}")
        return 1
    finally:
        server.close()
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
