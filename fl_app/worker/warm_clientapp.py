"""The executor's warm ClientApp process: one FAB's ClientApp, loaded once, run per task.

    python -m fl_app.worker.warm_clientapp --fd FD --project DIR --fab-id ID --fab-version V
        --fab-hash HASH

Started by `fl_app.worker.executor` for one installed FAB (its project folder DIR). It loads
that FAB's ClientApp once, as Flower's `flwr-clientapp` loads it, then serves the
executor's requests on the pipe FD one at a time: each is one task's message and context
(Flower's protobuf bytes), answered with the reply message and the context afterwards, or
with the exception the ClientApp raised. Whatever the ClientApp keeps in its process
(TensorFlow, the node's data, the compiled model) stays for the next task. It exits when
the pipe closes (the executor ended or dropped it) or on SIGTERM; it ignores
SIGINT (a Ctrl-C reaches the executor, which stops this process itself).
"""

from __future__ import annotations

import argparse
import signal
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType
from typing import Any

Request = dict[str, Any]
Reply = dict[str, Any]


def forget_launch_modules(project: Path) -> None:
    """Drop from `sys.modules` every module of a top-level package or module in `project`
    (this process was launched from the installed `fl_app`, which may differ from the FAB's
    copy): put `project` first on `sys.path` next, and the ClientApp is imported from the
    FAB, as Flower's `flwr-clientapp` imports it."""
    names = {path.stem if path.suffix == ".py" else path.name for path in project.iterdir()}
    for module in [m for m in sys.modules if m.split(".")[0] in names]:
        del sys.modules[module]


def _serve(conn: Connection, app: Any, task_api: ModuleType) -> None:
    """Answer requests on `conn` until it closes (a reply to an executor that has gone ends
    this process quietly); `task_api` is the executor's `fl_app.worker.task_api`."""
    from fl_app.flower_internals import TaskIdentity

    while True:
        try:
            request: Request = conn.recv()
        except EOFError:
            return
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = request["identity"]
        message, context = task_api.from_bytes(request)
        try:
            answer = {"ok": True, **task_api.to_bytes(app(message=message, context=context),
                                                      context)}
        except Exception as err:  # pylint: disable=broad-exception-caught
            answer = {"ok": False, "reason": task_api.exception_reason(err)}
        try:
            conn.send(answer)
        except OSError:  # the executor has gone (BrokenPipeError)
            return


def main(argv: list[str] | None = None) -> int:
    """Load the FAB's ClientApp, then serve the executor's tasks; the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--fab-id", required=True)
    parser.add_argument("--fab-version", required=True)
    parser.add_argument("--fab-hash", required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the executor stops this process itself
    conn = Connection(args.fd)
    # the executor's side, bound before the FAB's code replaces this installed copy
    from fl_app.worker import task_api

    forget_launch_modules(args.project)
    sys.path.insert(0, str(args.project))  # from here on, this app's code is the FAB's
    _serve(conn, task_api.load_client_app(args.fab_id, args.fab_version, args.fab_hash),
           task_api)
    return 0


if __name__ == "__main__":
    sys.exit(main())
