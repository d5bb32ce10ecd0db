"""A node's executor: takes its SuperNode's tasks and runs them in a warm ClientApp process.

    python -m fl_app.app.executor --runtime-api 127.0.0.1:PORT --secret-file FILE
        [--name NODE] [--parent-pid PID] [--task-timeout 600] [--poll 0.05]
    python -m fl_app.app.executor --new-secret --secret-file FILE

Next to a SuperNode started with `--isolation process --superexec-auth-secret-file FILE`,
this process replaces Flower's `flower-superexec`. Both take the node's tasks over its
Runtime API, signed with the secret (`fl_app.app.task_api`): a process without the secret
is refused (HTTP 401/403), so another local account cannot take the node's messages.
Flower's SuperExec starts a fresh `flwr-clientapp` process for every task (it installs the
FAB, imports TensorFlow and loads the node's data each time); this one keeps one warm
process per FAB (`fl_app.app.warm_clientapp`, at most `WARM_FABS` of them): the FAB is
installed and its ClientApp loaded once, and whatever the ClientApp keeps (TensorFlow, the
node's data, the compiled model) stays for the next task.

It runs one task at a time: pull the task's input, hand the message to the warm process,
push its reply and the task's status. A ClientApp that raises fails that message as
Flower's does (the server gets the exception). One that crashes or runs past
`--task-timeout` seconds fails that message with an error naming the node ("<node>: the
ClientApp process crashed (exit code N)"), and its process is replaced for the next task.
Each task's time is logged by phase ("task done in X s (pull a, run b, push c)").

It exits with status 0 on SIGTERM/SIGINT/SIGHUP and when the `--parent-pid` process (its
SuperNode) ends, stopping its warm processes first; with status 1 and an `error:` line when
the SuperNode refuses its secret or cannot be reached for `task_api.RETRY_SECONDS`.
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
from multiprocessing import Pipe
from pathlib import Path
from typing import Any

import httpx

from fl_app.app.secret_file import SecretFileError, ensure_secret, read_secret
from fl_app.app.task_api import (
    Acquired,
    Acquirer,
    Endpoint,
    NodeRefused,
    Task,
    error_reply,
    install,
)

DEFAULT_TASK_TIMEOUT = 600.0  # seconds a ClientApp may take for one message
DEFAULT_POLL = 0.05  # seconds between looks for a new task while there is none
WARM_FABS = 2  # FABs whose warm process is kept (the newest ones)
STOP_WAIT = 5.0  # seconds a warm process has to exit before it is killed

Log = Callable[[str], None]


class ClientAppFailed(RuntimeError):
    """The warm ClientApp process crashed or ran past the task timeout."""


class WarmProcess:
    """One FAB's ClientApp in a long-lived child process (`fl_app.app.warm_clientapp`)."""

    def __init__(self, project: Path, fab_id: str, fab_version: str, fab_hash: str) -> None:
        self.conn, child = Pipe()
        self.proc = subprocess.Popen(  # pylint: disable=consider-using-with
            [sys.executable, "-m", "fl_app.app.warm_clientapp", "--fd", str(child.fileno()),
             "--project", str(project), "--fab-id", fab_id, "--fab-version", fab_version,
             "--fab-hash", fab_hash], pass_fds=(child.fileno(),))
        child.close()

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def call(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send one task to the process; its answer.

        Raises ClientAppFailed when the process crashes or does not answer in `timeout`
        seconds (it is then stopped).
        """
        try:
            self.conn.send(request)
            if self.conn.poll(timeout):
                answer: dict[str, Any] = self.conn.recv()
                return answer
        except (EOFError, OSError):
            self.close()
            raise ClientAppFailed("the ClientApp process crashed (exit code "
                                  f"{self.proc.returncode})") from None
        self.close()
        raise ClientAppFailed(f"the ClientApp ran past the task timeout ({timeout:g} s); "
                              "its process was stopped")

    def close(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after `STOP_WAIT` seconds)."""
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
            try:
                self.run_task(acquired)
            except (httpx.HTTPError, RuntimeError) as err:  # the task fails, the node goes on
                self.log(f"task {acquired.task_id} (run {acquired.run_id}) failed: {err}")

    def _process(self, project: Path, fab_id: str, fab_version: str,
                 fab_hash: str) -> WarmProcess:
        """The FAB's warm process: the running one, else a new one (the oldest dropped)."""
        proc = self.warm.pop(fab_hash, None)
        if proc is None or not proc.alive():
            proc = WarmProcess(project, fab_id, fab_version, fab_hash)
            self.log(f"started a warm ClientApp process (pid {proc.proc.pid}) for FAB "
                     f"{fab_hash[:12]}")
        self.warm[fab_hash] = proc
        while len(self.warm) > WARM_FABS:
            self.warm.popitem(last=False)[1].close()
        return proc

    def run_task(self, acquired: Acquired) -> None:
        """Pull one task's input, run it in its warm process, push its reply and status."""
        from flwr.app import Message
        from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto
        from flwr.common.serde import message_to_proto
        from flwr.proto.message_pb2 import Context as ContextProto  # pylint: disable=E0611
        from flwr.proto.message_pb2 import Message as MessageProto  # pylint: disable=E0611

        start = time.perf_counter()
        task = Task(self.endpoint, acquired.token)
        try:
            message, context, run, fab = task.pull()
            pulled = time.perf_counter()
            proc = self._process(install(fab, run), run.fab_id, run.fab_version, fab.hash_str)
            request = {"identity": (acquired.task_id, run.run_id, context.node_id),
                       "message": message_to_proto(message).SerializeToString(),
                       "context": context_to_proto(context).SerializeToString()}
            failed: str | None = None
            try:
                answer = proc.call(request, self.task_timeout)
            except ClientAppFailed as err:
                answer = {"ok": False, "reason": f"{self.name}: {err}"}
            if answer["ok"]:
                reply: Message = message_from_proto(MessageProto.FromString(answer["message"]))
                context = context_from_proto(ContextProto.FromString(answer["context"]))
            else:
                failed = answer["reason"]
                reply = error_reply(message, failed)
                self.log(f"task {acquired.task_id} failed: {failed}")
            ran = time.perf_counter()
            task.finish(reply, context, failed)
        finally:
            task.close()
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
    """Call `on_exit` once process `pid` has ended (checked every second, in a thread)."""
    import psutil

    def ended() -> bool:
        try:
            parent = psutil.Process(pid)
            return not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def watch() -> None:
        while not ended():
            time.sleep(1.0)
        on_exit()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m fl_app.app.executor",
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

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    if args.parent_pid:
        def parent_ended() -> None:
            log(f"its SuperNode (pid {args.parent_pid}) ended: stopping")
            executor.close()
            os._exit(0)  # a call may be blocked retrying the SuperNode that has gone

        watch_parent(args.parent_pid, parent_ended)
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
