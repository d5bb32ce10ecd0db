"""Flower's task API, as this app's executor uses it.

A SuperNode started with `--isolation process` launches no ClientApp itself: it queues each
message as a task on its Runtime API (`127.0.0.1:PORT`), and an executor outside it takes
the task and runs it. Flower's own executor is `flower-superexec` (one fresh
`flwr-clientapp` process per task); `fl_app.worker.executor` is this app's, which keeps the
ClientApp warm. Both speak the same API, with the same Flower classes, used here as
Flower's `flwr/supercore/superexec/run_superexec.py` (acquire a task) and
`flwr/supernode/runtime/run_clientapp.py` (pull its input, push its reply and output)
use them:

* `Acquirer`: `AcquireTask`, signed with the SuperExec secret the SuperNode was started
  with (`--superexec-auth-secret-file`; Flower's `SuperExecAuthHttpInterceptor`). Without
  the secret the SuperNode answers HTTP 401/403 (`NodeRefused`): another local account, or
  any process that cannot read the secret file, cannot take the node's tasks.
* `Task`: one acquired task, by its one-time token (`RuntimeTokenHttpInterceptor`): pulls
  the message, context, run and FAB (`pull_task_input`), keeps the task alive
  (`HeartbeatSender`), pushes the reply (`push_message`) and the final status
  (`push_task_output`).
* `install`, `load_client_app`: the FAB installed under FLWR_HOME once per hash, its
  ClientApp loaded as Flower loads it.

These are Flower's internal, unversioned classes, imported from `fl_app.flower_internals`:
`tests/test_flower_internals.py` pins every name and signature used here and the flwr range
the project is tested with (`FLWR_TESTED`), so a flwr upgrade that changes them fails
loudly there, not in a deployment.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import httpx
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

from fl_app.flower_internals import (
    AcquireTaskRequest,
    ContextProto,
    ErrorCode,
    Fab,
    HeartbeatSender,
    MessageProto,
    Node,
    ProtobufClientInterceptor,
    PullAppMessagesRequest,
    PullTaskInputRequest,
    RetryInvoker,
    Run,
    RuntimeHttpClient,
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SubStatus,
    SuperExecAuthHttpInterceptor,
    TaskIdentity,
    TaskType,
    context_from_proto,
    context_to_proto,
    exponential,
    fab_from_proto,
    get_load_client_app_fn,
    get_project_dir,
    install_from_fab,
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
    make_task_heartbeat_fn_http,
    message_from_proto,
    message_to_proto,
    pull_and_inflate_object_from_tree,
    push_message,
    push_task_output,
    run_from_proto,
)

COMPONENT = "fl-app-executor"
ACQUIRE_METHOD = "/flwr.proto.Runtime/AcquireTask"
RETRY_SECONDS = 60.0  # how long a call retries while the SuperNode cannot be reached
# A task is handed out as soon as the SuperNode has its message, often before the message's
# objects (the arrays) have all arrived from the SuperLink; Flower's pull then waits 1 s
# before asking again (`PULL_INITIAL_BACKOFF`), here 20 ms, doubling up to 0.5 s.
OBJECT_RETRY_FIRST = 0.02
OBJECT_RETRY_CAP = 0.5
CLIENT_APP_ERROR = ErrorCode.CLIENT_APP_RAISED_EXCEPTION


class NodeRefused(RuntimeError):
    """The SuperNode refused this executor (HTTP 401/403: a wrong or missing secret)."""


def _retry_invoker() -> RetryInvoker:
    """Retries a call only when the SuperNode cannot be reached (it is starting, or gone),
    for `RETRY_SECONDS`. Flower's own invoker (`make_simple_http_retry_invoker`) answers an
    HTTP 401 by sending SIGINT to its own process; here a refusal is an exception."""
    # max_delay in seconds: Flower annotates it as an int (its docstring says float)
    return RetryInvoker(wait_gen_factory=lambda: exponential(max_delay=2),
                        recoverable_exceptions=httpx.TransportError, max_tries=None,
                        max_time=RETRY_SECONDS)


@dataclass(frozen=True)
class Endpoint:
    """A SuperNode's Runtime API: `address` (host:port), plain HTTP on loopback unless
    `root_certificates` (a PEM file) is given."""

    address: str
    root_certificates: str | None = None

    def client(self, *interceptors: ProtobufClientInterceptor) -> RuntimeHttpClient:
        """A Runtime API client with Flower's version header and `interceptors`."""
        return RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=self.root_certificates is None,
            root_certificates=self.root_certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name=COMPONENT),
                          *interceptors],
            retry_invoker=_retry_invoker())


def _refusal(err: httpx.HTTPStatusError) -> NodeRefused | None:
    """A `NodeRefused` for an HTTP 401/403 answer, else None."""
    code = err.response.status_code
    if code in (httpx.codes.UNAUTHORIZED, httpx.codes.FORBIDDEN):
        return NodeRefused(f"HTTP {code}")
    return None


@dataclass(frozen=True)
class Acquired:
    """A task taken from the SuperNode: its one-time token and id."""

    token: str
    task_id: int


class Acquirer:
    """Takes the SuperNode's ClientApp tasks, one per call, signed with `secret`."""

    def __init__(self, endpoint: Endpoint, secret: bytes) -> None:
        self._client = endpoint.client(SuperExecAuthHttpInterceptor(
            master_secret=secret, protected_methods=frozenset({ACQUIRE_METHOD})))

    def acquire(self) -> Acquired | None:
        """The oldest pending ClientApp task, or None when there is none.

        Raises NodeRefused when the SuperNode refuses the secret.
        """
        try:
            res = self._client.AcquireTask(AcquireTaskRequest(
                supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[]))
        except httpx.HTTPStatusError as err:
            refused = _refusal(err)
            if refused is not None:
                raise refused from None
            raise
        if not (res.HasField("task") and res.token):
            return None
        return Acquired(res.token, res.task.task_id)

    def close(self) -> None:
        """Close the connection."""
        self._client.close()


class Task:
    """One acquired task, reached with its token: its input, heartbeat, reply and output."""

    def __init__(self, endpoint: Endpoint, token: str) -> None:
        self._client = endpoint.client(RuntimeTokenHttpInterceptor(token))
        self._heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(self._client))

    def pull(self) -> tuple[Message, Context, Run, Fab]:
        """Start the task's heartbeat; its message, context, run and FAB (as Flower's
        `run_clientapp.pull_task_input` pulls them, retrying a missing object sooner)."""
        self._heartbeat.start()
        res = self._client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id = res.task_id
        TaskIdentity.run_id = res.run.run_id
        TaskIdentity.node_id = res.context.node_id
        context = context_from_proto(res.context)
        messages = self._client.PullMessages(PullAppMessagesRequest())
        if not messages.messages_list:
            raise RuntimeError("the task has no message")
        node = Node(node_id=context.node_id)
        tree = messages.message_object_trees[0]
        message = pull_and_inflate_object_from_tree(
            tree, make_pull_object_fn_protobuf(self._client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(self._client.ConfirmMessageReceived,
                                                      node, context.run_id),
            return_type=Message, initial_backoff=OBJECT_RETRY_FIRST,
            backoff_cap=OBJECT_RETRY_CAP)
        message.metadata.__dict__["_message_id"] = tree.object_id  # not in the deflated one
        return message, context, run_from_proto(res.run), fab_from_proto(res.fab)

    def finish(self, reply: Message | None, context: Context | None,
               failed: str | None) -> None:
        """Push `reply` (when there is one and the context it belongs to) and, whatever
        happens to it, the final status with `context` (`failed`: why the task failed)."""
        try:
            if reply is not None and context is not None:
                push_message(self._client, reply, context)
        finally:
            push_task_output(self._client, context,
                             SubStatus.FAILED if failed else SubStatus.COMPLETED, failed or "")

    def close(self) -> None:
        """Stop the heartbeat and close the connection."""
        if self._heartbeat.is_running:
            self._heartbeat.stop()
        self._client.close()


def to_bytes(message: Message, context: Context) -> dict[str, bytes]:
    """`message` and `context` as Flower's protobuf bytes (what crosses the executor's pipe)."""
    return {"message": message_to_proto(message).SerializeToString(),
            "context": context_to_proto(context).SerializeToString()}


def from_bytes(encoded: dict[str, bytes]) -> tuple[Message, Context]:
    """The message and context `to_bytes` encoded."""
    return (message_from_proto(MessageProto.FromString(encoded["message"])),
            context_from_proto(ContextProto.FromString(encoded["context"])))


def error_reply(message: Message, reason: str, code: int = CLIENT_APP_ERROR) -> Message:
    """The reply a failed ClientApp gives `message` (as Flower's `run_clientapp` builds it)."""
    return Message(Error(code=code, reason=reason), reply_to=message)


def exception_reason(err: BaseException) -> str:
    """A ClientApp exception as Flower's `run_clientapp` reports it to the server."""
    return str(type(err)) + ":<'" + str(err) + "'>"


INSTALLED = ".fl-app-installed"  # written into a FAB's folder once it is installed whole


def install(fab: Fab, run: Run) -> Path:
    """The FAB's project folder under FLWR_HOME, installed on first use of its hash, under
    a lock (executors may share FLWR_HOME); a folder an interrupted install left without
    its `INSTALLED` mark is installed again."""
    folder = Path(get_project_dir(run.fab_id, run.fab_version, fab.hash_str))
    folder.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = os.open(folder.parent / ".fl-app-install.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / INSTALLED).is_file():
            shutil.rmtree(folder, ignore_errors=True)
            install_from_fab(fab.content, skip_prompt=True)
            (folder / INSTALLED).touch(mode=0o600)
    finally:
        os.close(lock)  # releases the lock
    return folder


def load_client_app(fab_id: str, fab_version: str, fab_hash: str) -> ClientApp:
    """The ClientApp of an installed FAB, loaded as Flower's `run_clientapp` loads it."""
    load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
    return load(fab_id, fab_version, fab_hash)
