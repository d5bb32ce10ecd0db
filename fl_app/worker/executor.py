"""A node's executor: takes its SuperNode's tasks and runs them in a warm ClientApp process.

    python -m fl_app.worker.executor --runtime-api 127.0.0.1:PORT --secret-file FILE
        [--name NODE] [--parent-pid PID] [--task-timeout 600] [--poll 0.05]
    python -m fl_app.worker.executor --new-secret --secret-file FILE

Next to a SuperNode started with `--isolation process --superexec-auth-secret-file FILE`,
this process replaces Flower's `flower-superexec`. Both take the node's tasks over its
Runtime API, signed with the secret (`fl_app.worker.task_api`): a process without the secret
is refused (HTTP 401/403), so another local account cannot take the node's messages.
Flower's SuperExec starts a fresh `flwr-clientapp` process for every task (it installs the
FAB, imports TensorFlow and loads the node's data each time); this one keeps one warm
process per FAB (`fl_app.worker.warm_clientapp`, at most `WARM_FABS` of them): the FAB is
installed and its ClientApp loaded once, and whatever the ClientApp keeps (TensorFlow, the
node's data, the compiled model) stays for the next task.

It runs one task at a time: pull the task's input, hand the message to the warm process,
push its reply and the task's status. A ClientApp that raises fails that message as
Flower's does (the server gets the exception). One that crashes or runs past
`--task-timeout` seconds fails that message with an error naming the node ("<node>: the
ClientApp process crashed (exit code N)"), and its process is replaced for the next task.
Each task's time is logged by phase ("task done in X s (pull a, run b, push c)").

Before taking any task it checks that the process listening on the Runtime API belongs to
this account (and is the `--parent-pid` SuperNode): another account that bound the port
first could otherwise hand out tasks of its own (not needed with `--root-certificates`, a
Runtime API served over TLS). A failure anywhere in a task (pulling it, installing its FAB,
running it) fails that task with an error reply and a FAILED status; the executor goes on.

It exits with status 0 on SIGTERM/SIGINT/SIGHUP (a task in progress fails at once: its
warm process is stopped) and when the `--parent-pid` process (its SuperNode) ends, stopping
its warm processes first; with status 1 and an `error:` line when the Runtime API is not
the SuperNode's, or the SuperNode refuses its secret or cannot be reached for
`task_api.RETRY_SECONDS`.
`--new-secret` makes FILE (mode 600, a random secret) if it is missing, and exits.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from importlib.metadata import version
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

import httpx
from flwr.app import Context, Message

from fl_app.flower_internals import FLWR_TESTED, Fab, Run
from fl_app.worker.secret_file import SecretFileError, ensure_secret, read_secret
from fl_app.worker.task_api import (
    RETRY_SECONDS,
    Acquired,
    Acquirer,
    Endpoint,
    NodeRefused,
    Task,
    error_reply,
    from_bytes,
    install,
    to_bytes,
)

DEFAULT_TASK_TIMEOUT = 600.0  # seconds a ClientApp may take for one message
DEFAULT_POLL = 0.05  # seconds between looks for a new task while there is none
WARM_FABS = 2  # FABs whose warm process is kept (the newest ones)
STOP_WAIT = 5.0  # seconds a warm process has to exit before it is killed

Log = Callable[[str], None]


class ClientAppFailed(RuntimeError):
    """The warm ClientApp process crashed, ran past the task timeout or was stopped."""


class WarmProcess:
    """One FAB's ClientApp in a long-lived child process (`fl_app.worker.warm_clientapp`)."""

    def __init__(self, project: Path, fab_id: str, fab_version: str, fab_hash: str) -> None:
        self.conn, child = Pipe()
        self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
            [sys.executable, "-m", "fl_app.worker.warm_clientapp", "--fd", str(child.fileno()),
             "--project", str(project), "--fab-id", fab_id, "--fab-version", fab_version,
             "--fab-hash", fab_hash], pass_fds=(child.fileno(),))
        child.close()
        self._why: str | None = None  # why the process was stopped during a call

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one task to the process; its answer.

        Raises ClientAppFailed when the process crashes, is stopped (`stop`) or does not
        answer within `timeout` seconds of the call (sending included; it is then stopped).
        """
        watchdog = threading.Timer(timeout, self.stop, args=(
            f"the ClientApp ran past the task timeout ({timeout:g} s); its process was "
            "stopped",))
        watchdog.daemon = True
        watchdog.start()
        try:
            self.conn.send(request)
            answer: dict[str, Any] = self.conn.recv()
            return answer
        except (EOFError, OSError):
            self.close()
            raise ClientAppFailed(self._why or "the ClientApp process crashed (exit code "
                                  f"{self.proc.returncode})") from None
        finally:
            watchdog.cancel()

    def stop(self, why: str) -> None:
        """End the process now (a call in progress fails with `why`)."""
        self._why = why
        if self.alive():
            self.proc.kill()

    def close(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after `STOP_WAIT` seconds) and reap it."""
        self.conn.close()
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


class Executor:
    """Takes the node's tasks one at a time and runs each in its FAB's warm process.

    Args:
        endpoint: the SuperNode's Runtime API.
        secret: the SuperExec secret the SuperNode was started with.
        name: the node's name in errors and the log.
        task_timeout: seconds a ClientApp may take for one message.
        log: where progress lines go.
    """

    def __init__(self, endpoint: Endpoint, secret: bytes, name: str, task_timeout: float,
                 log: Log) -> None:
        self.endpoint = endpoint
        self.acquirer = Acquirer(endpoint, secret)
        self.name = name
        self.task_timeout = task_timeout
        self.log = log
        self.warm: OrderedDict[str, WarmProcess] = OrderedDict()
        self.running: WarmProcess | None = None
        self.done = 0

    def serve(self, stop: threading.Event, poll: float) -> None:
        """Run tasks until `stop` is set, looking for one every `poll` seconds while idle.

        Raises NodeRefused when the SuperNode refuses the secret, httpx.TransportError when
        it cannot be reached.
        """
        while not stop.is_set():
            acquired = self.acquirer.acquire()
            if acquired is None:
                stop.wait(poll)
                continue
            self.run_task(acquired)

    def interrupt(self, why: str) -> None:
        """Stop the warm process of the task in progress, if any (it fails with `why`)."""
        running = self.running
        if running is not None:
            running.stop(why)

    def _process(self, fab: Fab, run: Run) -> WarmProcess:
        """The FAB's warm process: the running one, else a new one on the FAB installed
        (once per hash, `task_api.install`); the oldest is dropped past `WARM_FABS`."""
        proc = self.warm.pop(fab.hash_str, None)
        if proc is not None and not proc.alive():
            proc.close()
            proc = None
        if proc is None:
            proc = WarmProcess(install(fab, run), run.fab_id, run.fab_version, fab.hash_str)
            self.log(f"started a warm ClientApp process (pid {proc.proc.pid}) for FAB "
                     f"{fab.hash_str[:12]}")
        self.warm[fab.hash_str] = proc
        while len(self.warm) > WARM_FABS:
            self.warm.popitem(last=False)[1].close()
        return proc

    def _run(self, task_id: int, message: Message, context: Context, run: Run,
             fab: Fab) -> tuple[Message, Context, str | None]:
        """Run one pulled task in its FAB's warm process: the reply, the context after it,
        and why it failed (None when the ClientApp answered)."""
        proc = self._process(fab, run)
        request = {"identity": (task_id, run.run_id, context.node_id),
                   **to_bytes(message, context)}
        self.running = proc
        try:
            answer = proc.call(request, self.task_timeout)
        except ClientAppFailed as err:
            return error_reply(message, f"{self.name}: {err}"), context, f"{self.name}: {err}"
        finally:
            self.running = None
        if not answer["ok"]:
            return error_reply(message, answer["reason"]), context, answer["reason"]
        reply, context = from_bytes(answer)
        return reply, context, None

    def run_task(self, acquired: Acquired) -> None:
        """Pull one task's input, run it in its warm process, push its reply and status.
        Whatever fails on the way, the task ends with an error reply (once its message is
        known) and a FAILED status, and the executor goes on with the next task."""
        start = time.perf_counter()
        task = Task(self.endpoint, acquired.token)
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        failed: str | None = f"{self.name}: the executor could not run the task"
        pulled = ran = start
        try:
            message, context, run, fab = task.pull()
            pulled = time.perf_counter()
            reply, context, failed = self._run(acquired.task_id, message, context, run, fab)
        except Exception as err:  # pylint: disable=broad-exception-caught
            failed = f"{self.name}: the executor could not run the task: {err!r}"
            reply = error_reply(message, failed) if message is not None else None
        finally:
            ran = time.perf_counter()
            try:
                task.finish(reply, context, failed)
            except Exception as err:  # pylint: disable=broad-exception-caught
                self.log(f"task {acquired.task_id}: its reply could not be pushed: {err!r}")
            task.close()
        if failed:
            self.log(f"task {acquired.task_id} failed: {failed}")
        self.done += 1
        end = time.perf_counter()
        self.log(f"task {acquired.task_id} done in {end - start:.3f} s (pull "
                 f"{pulled - start:.3f}, run {ran - pulled:.3f}, push {end - ran:.3f})")

    def close(self) -> None:
        """Stop every warm process and close the connection."""
        while self.warm:
            self.warm.popitem()[1].close()
        self.acquirer.close()


def watch_parent(pid: int, on_exit: Callable[[], None]) -> None:
    """Call `on_exit` once process `pid` has ended (checked every second, in a thread; the
    process is looked up once, so a reused pid does not look alive)."""
    import psutil

    try:
        parent: psutil.Process | None = psutil.Process(pid)
    except psutil.Error:
        parent = None

    def ended() -> bool:
        try:
            return parent is None or not parent.is_running() or \
                parent.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def watch() -> None:
        while not ended():
            time.sleep(1.0)
        on_exit()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def check_listener(address: str, parent_pid: int | None, wait: float) -> str | None:
    """Why the Runtime API at `address` (host:port) is not the SuperNode's, or None.

    Another local account could bind the port before the SuperNode does and hand out tasks
    of its own (code to run as this account): the process that listens there must belong
    to this account (and be `parent_pid`, when given). Waits up to `wait` seconds for a
    listener.
    """
    import psutil

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + wait
    while True:
        owners = {conn.pid for conn in psutil.net_connections(kind="tcp")
                  if conn.status == psutil.CONN_LISTEN and conn.laddr
                  and conn.laddr.port == int(port) and conn.laddr.ip in (host, "0.0.0.0", "::")}
        if owners or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not owners:
        return f"nothing listens on {address}"
    for pid in owners:
        try:
            uid = psutil.Process(pid).uids().real if pid is not None else None
        except psutil.Error:
            uid = None
        if uid != os.getuid():
            return (f"the process listening on {address} does not belong to this account: "
                    "it is not this node's SuperNode")
        if parent_pid and pid != parent_pid:
            return (f"the process listening on {address} (pid {pid}) is not the SuperNode "
                    f"--parent-pid names ({parent_pid})")
    return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m fl_app.worker.executor",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--runtime-api", default="127.0.0.1:9094",
                        help="the SuperNode's Runtime API (its --host:--port)")
    parser.add_argument("--secret-file", type=Path, required=True,
                        help="the SuperNode's --superexec-auth-secret-file")
    parser.add_argument("--new-secret", action="store_true",
                        help="make --secret-file (mode 600) if it is missing, and exit")
    parser.add_argument("--root-certificates", default=None,
                        help="CA certificate of a Runtime API served over TLS")
    parser.add_argument("--name", default=None, help="the node's name in errors and logs")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the SuperNode) ends")
    parser.add_argument("--task-timeout", type=float, default=DEFAULT_TASK_TIMEOUT)
    parser.add_argument("--poll", type=float, default=DEFAULT_POLL)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the executor until a signal, its SuperNode's end, or a refusal; the exit status."""
    args = parse_args(argv)
    name = args.name or f"executor for {args.runtime_api}"

    def log(line: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {name}: {line}", file=sys.stderr, flush=True)

    try:
        if args.new_secret:
            ensure_secret(args.secret_file)
            return 0
        secret = read_secret(args.secret_file)
    except SecretFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    executor = Executor(Endpoint(args.runtime_api, args.root_certificates), secret, name,
                        args.task_timeout, log)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log(f"stopping ({signal.Signals(signum).name})")
        stop.set()
        executor.interrupt(f"{name}: the executor was stopped ({signal.Signals(signum).name})")

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    if args.parent_pid:
        def parent_ended() -> None:
            log(f"its SuperNode (pid {args.parent_pid}) ended: stopping")
            try:
                executor.close()
            finally:
                os._exit(0)  # a call may be blocked retrying the SuperNode that has gone

        watch_parent(args.parent_pid, parent_ended)
    flwr_minor = ".".join(version("flwr").split(".")[:2])
    if flwr_minor not in FLWR_TESTED:
        log(f"warning: flwr {version('flwr')} is installed; this executor is tested with "
            f"flwr {', '.join(FLWR_TESTED)} (see tests/test_flower_internals.py)")
    if args.root_certificates is None:  # plain HTTP: make sure it is the node's own API
        problem = check_listener(args.runtime_api, args.parent_pid, RETRY_SECONDS)
        if problem is not None:
            executor.close()
            print(f"error: {name}: {problem}", file=sys.stderr)
            return 1
    log(f"taking tasks from {args.runtime_api}")
    try:
        executor.serve(stop, args.poll)
    except NodeRefused as err:
        print(f"error: {name}: the SuperNode at {args.runtime_api} refused this executor "
              f"({err}): --secret-file must be the file its --superexec-auth-secret-file "
              "names", file=sys.stderr)
        return 1
    except httpx.TransportError as err:
        print(f"error: {name}: the SuperNode's Runtime API at {args.runtime_api} cannot be "
              f"reached: {err}", file=sys.stderr)
        return 1
    finally:
        executor.close()
    log(f"stopped after {executor.done} task(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
