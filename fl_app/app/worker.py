"""A node's long-lived worker: TensorFlow, the node's data and the compiled model, kept warm.

    python -m fl_app.app.worker --socket PATH [--authkey-file FILE] [--parent-pid PID]

Flower's SuperNode starts one ClientApp process per message; with `worker-socket` in its
node config, that process (`fl_app.app.client_app`, which imports no TensorFlow) forwards the
call here (`fl_app.app.worker_link`). This process imports TensorFlow once, keeps the node's
data loaded and validated for the last `DATA_RUNS` run configs, and the process-wide trainer
(`fl_app.ml.trainer.trainer_for`: the built model and its traced loops), and runs the
`KerasClient` call, one at a time.

Only local clients that know the key reach it: it listens on the Unix socket PATH (created
mode 600, in a folder of mode 700) and challenges every connection with the key in FILE
(default PATH with suffix .key; mode 600, made if missing). It exits, removing its socket, on
SIGTERM/SIGINT or when the process PID (the SuperNode) ends. Its log is PATH.log.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Mapping
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, Listener
from typing import Any

from fl_app.app.worker_link import (
    PROTOCOL,
    WorkerAddress,
    WorkerError,
    ensure_authkey,
    private_dir,
)
from fl_app.data.files import file_stamp
from fl_app.schema import Scalar

DATA_RUNS = 2  # run configs whose node data stays loaded
REQUEST_WAIT = 30.0  # seconds a connected client has to send its request


class Worker:
    """Serves `KerasClient` calls on a listener, one at a time, with bounded caches."""

    def __init__(self, address: WorkerAddress, log) -> None:
        self.address = address
        self.log = log
        self.data: OrderedDict[tuple, Any] = OrderedDict()
        self.served = 0

    def node_data(self, cfg, node_config: Mapping[str, Scalar]):
        """The node's data for `cfg`, from the cache (loaded on a miss)."""
        from fl_app.data.node_data import load_client
        from fl_app.ml.trainer import cached_trainer

        key = (tuple(sorted(cfg.items())), tuple(sorted(node_config.items())),
               file_stamp(str(node_config.get("data-path", ""))))
        if key in self.data:
            self.data.move_to_end(key)
        else:
            self.data[key] = load_client(cfg, node_config)
            while len(self.data) > DATA_RUNS:
                evicted, _ = self.data.popitem(last=False)
                if _trainer_key(evicted[0]) not in {_trainer_key(k[0]) for k in self.data}:
                    cached_trainer.cache_clear()  # models of runs gone: rebuilt if they return
                gc.collect()
        return self.data[key]

    def client(self, cfg, node_config: Mapping[str, Scalar]):
        """The node's client for `cfg`: its cached data and the shared trainer (fit metrics
        time each, `fl_app.client.timing`: both near 0 once loaded and built)."""
        from fl_app.app.local_client import client_for

        return client_for(cfg, node_config, lambda: self.node_data(cfg, node_config))

    def handle(self, request: Mapping[str, Any]) -> Any:
        """Run one request's call; return its result."""
        from fl_app.app.config import resolve

        if request.get("protocol") != PROTOCOL:
            raise WorkerError(f"the ClientApp speaks worker protocol {request.get('protocol')}, "
                              f"this worker {PROTOCOL}: restart the worker")
        cfg = resolve(request["run_config"])
        client = self.client(cfg, request["node_config"])
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

    def serve_one(self, conn: Connection) -> None:
        """Read one request from `conn`, answer it (the result or the error)."""
        with conn:
            if not conn.poll(REQUEST_WAIT):
                return
            request = conn.recv()
            start = time.perf_counter()
            try:
                reply = {"ok": True, "result": self.handle(request)}
            except Exception as err:  # the call fails, the worker stays
                self.log(f"{request.get('method')} failed: "
                         f"{''.join(traceback.format_exception(err)).strip()}")
                reply = {"ok": False, "type": type(err).__name__,
                         "error": f"{type(err).__name__}: {err}", "message": str(err)}
            self.served += 1
            self.log(f"{request.get('method')} served in {time.perf_counter() - start:.3f} s "
                     f"(request {self.served})")
            conn.send(reply)

    def serve(self, listener: Listener) -> None:
        """Accept and serve connections until the process is told to stop."""
        while True:
            try:
                conn = listener.accept()
            except AuthenticationError:
                self.log("refused a connection that did not answer the key challenge")
                continue
            except (OSError, EOFError) as err:
                self.log(f"a connection failed before its request: {err!r}")
                continue
            try:
                self.serve_one(conn)
            except EOFError:  # a probe (is a worker listening?) that sent nothing
                continue
            except OSError as err:  # the ClientApp went away mid-call
                self.log(f"lost a connection: {err!r}")


def _trainer_key(cfg_items: tuple) -> tuple:
    cfg = dict(cfg_items)
    return tuple(cfg.get(k) for k in ("model", "optimizer", "learning-rate", "seed", "dataset"))


def _watch_parent(pid: int, cleanup) -> None:
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    address = WorkerAddress(args.socket, args.authkey_file)
    private_dir(address.socket.parent)
    authkey = ensure_authkey(address.authkey_file)
    log_fd = os.open(address.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    log_file = os.fdopen(log_fd, "a", encoding="utf-8")

    def log(message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} worker[{os.getpid()}] {message}\n"
        log_file.write(line)
        log_file.flush()
        print(line, end="", file=sys.stderr, flush=True)

    try:  # a live worker already serves this socket: leave it be
        address.connect().close()
        log("another worker already listens on this socket; exiting")
        return 0
    except (OSError, EOFError, AuthenticationError):
        if address.socket.is_socket():  # a stale socket; never a file that merely has its name
            address.socket.unlink()
        elif address.socket.exists():
            log(f"{address.socket} exists and is not a socket; exiting")
            return 1

    old_umask = os.umask(0o077)
    try:
        listener = Listener(str(address.socket), family="AF_UNIX", authkey=authkey)
    finally:
        os.umask(old_umask)
    address.socket.chmod(0o600)
    pid_fd = os.open(address.pid_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(pid_fd, "w", encoding="ascii") as pid_file:
        pid_file.write(str(os.getpid()))
    done = threading.Lock()

    def cleanup(reason: str = "stopping") -> None:
        if not done.acquire(blocking=False):
            return
        log(f"{reason}; removing {address.socket}")
        for path in (address.socket, address.pid_file):
            path.unlink(missing_ok=True)

    def on_signal(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    if args.parent_pid:
        _watch_parent(args.parent_pid, cleanup)
    log(f"started: listening on {address.socket} (parent pid {args.parent_pid})")
    try:
        start = time.perf_counter()
        import fl_app.app.local_client  # noqa: F401  (TensorFlow, once per worker)

        log(f"tensorflow imported in {time.perf_counter() - start:.2f} s")
        Worker(address, log).serve(listener)
    finally:
        try:
            listener.close()  # it unlinks the socket itself
        except OSError:
            pass
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
