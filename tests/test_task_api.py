"""The Flower internals `fl_app.app.task_api` uses, pinned: a flwr upgrade that renames or
reshapes one fails here, naming it, instead of in a deployment."""

from __future__ import annotations

import inspect
import tomllib
from pathlib import Path

import flwr
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesResponse,
    PullTaskInputResponse,
)
from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
from flwr.supercore.superexec import run_superexec
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from fl_app.app import task_api

ROOT = Path(__file__).resolve().parents[1]


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_the_installed_flwr_is_one_the_task_api_is_tested_with():
    minor = ".".join(flwr.__version__.split(".")[:2])
    assert minor in task_api.FLWR_TESTED, (
        f"flwr {flwr.__version__}: fl_app.app.task_api is tested with {task_api.FLWR_TESTED}; "
        "check every name below against the new flwr, then add it")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "flwr[simulation]>=1.41,<2" in dependencies


def test_the_task_api_functions_keep_their_signatures():
    assert {"initial_backoff", "backoff_cap", "return_type"} <= \
        set(_params(task_api.pull_and_inflate_object_from_tree))
    assert _params(task_api.make_pull_object_fn_protobuf)[:3] == ["pull_object_protobuf",
                                                                   "node", "run_id"]
    assert _params(task_api.push_message) == ["client", "message", "context"]
    assert _params(task_api.push_task_output) == ["client", "context", "sub_status", "details"]
    assert _params(task_api.make_task_heartbeat_fn_http) == ["client"]
    assert _params(task_api.HeartbeatSender) == ["heartbeat_fn"]
    assert {"start", "stop", "is_running"} <= set(dir(task_api.HeartbeatSender))
    assert _params(task_api.install_from_fab) == ["fab_file", "install_dir", "skip_prompt"]
    assert _params(task_api.get_project_dir)[:3] == ["fab_id", "fab_version", "fab_hash"]
    assert _params(task_api.get_load_client_app_fn) == ["default_app_ref", "app_path",
                                                        "multi_app"]


def test_the_clients_and_interceptors_keep_their_signatures():
    assert _params(task_api.RuntimeHttpClient.from_server_address) == [
        "server_address", "insecure", "root_certificates", "interceptors", "retry_invoker"]
    for method in ("AcquireTask", "PullTaskInput", "PullMessages", "PullObject",
                   "ConfirmMessageReceived", "PushMessages",
                   "PushTaskOutput", "SendTaskHeartbeat", "close"):
        assert hasattr(task_api.RuntimeHttpClient, method), method
    assert _params(task_api.SuperExecAuthHttpInterceptor) == ["master_secret",
                                                             "protected_methods"]
    assert _params(task_api.RuntimeTokenHttpInterceptor) == ["token"]
    assert _params(task_api.RuntimeVersionHttpInterceptor) == ["component_name"]
    assert {"wait_gen_factory", "recoverable_exceptions", "max_tries", "max_time"} <= \
        set(_params(task_api.RetryInvoker))


def test_the_protocol_names_match_flowers_own_superexec():
    # Flower's SuperExec signs exactly this method with the secret, and asks for these
    assert run_superexec._SUPEREXEC_AUTH_METHODS == frozenset({task_api.ACQUIRE_METHOD})
    assert set(AcquireTaskRequest.DESCRIPTOR.fields_by_name) >= {"supported_task_types",
                                                                  "agentapp_fab_hashes"}
    assert set(Task.DESCRIPTOR.fields_by_name) >= {"task_id", "run_id", "fab_hash"}
    assert {"task_id", "run", "context", "fab"} <= set(
        PullTaskInputResponse.DESCRIPTOR.fields_by_name)
    assert {"messages_list", "message_object_trees"} <= set(
        PullAppMessagesResponse.DESCRIPTOR.fields_by_name)
    for name in ("task_id", "run_id", "node_id"):  # settable properties of its metaclass
        assert isinstance(getattr(type(task_api.TaskIdentity), name), property), name
    assert task_api.TaskType.CLIENT_APP == "flwr-clientapp"
    assert (task_api.SubStatus.COMPLETED, task_api.SubStatus.FAILED) == ("completed", "failed")
    assert int(task_api.CLIENT_APP_ERROR) == int(task_api.ErrorCode.CLIENT_APP_RAISED_EXCEPTION)


def test_the_supernode_takes_the_flags_deploy_gives_it():
    args = _parse_args_run_supernode().parse_args(
        ["--superlink", "127.0.0.1:9092", "--isolation", "process",
         "--superexec-auth-secret-file", "/tmp/secret"])
    assert args.isolation == "process" and args.superexec_auth_secret_file == "/tmp/secret"
