"""Every Flower internal the project uses (`fl_app.flower_internals`), pinned: a flwr upgrade
that moves, renames or reshapes one fails here, naming it, instead of in a run or a
deployment; and no module but that one imports a Flower internal."""

from __future__ import annotations

import ast
import dataclasses
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

from fl_app import flower_internals as fi
from fl_app.worker import task_api

ROOT = Path(__file__).resolve().parents[1]
PROJECT_CODE = ("fl_app", "strategies", "deploy", "scripts", "examples", "run_simulation.py")
# Flower's public API: its packages' exports, and the modules every custom strategy imports
PUBLIC = {"flwr.app", "flwr.client", "flwr.client.mod", "flwr.clientapp", "flwr.common",
          "flwr.server", "flwr.serverapp", "flwr.simulation", "flwr.server.strategy",
          "flwr.server.workflow", "flwr.server.client_manager", "flwr.server.client_proxy",
          "flwr.server.criterion", "flwr.common.typing", "flwr.common.logger",
          "flwr.server.strategy.aggregate"}


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _flower_imports(path: Path) -> set[str]:
    """The flwr modules a file imports, anywhere in it (`import flwr.x` or `from flwr.x`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m == "flwr" or m.startswith("flwr.")}


def test_no_module_but_the_adapter_imports_a_flower_internal():
    adapter = ROOT / "fl_app" / "flower_internals.py"
    files = [p for top in PROJECT_CODE for p in
             ([ROOT / top] if top.endswith(".py") else (ROOT / top).rglob("*.py"))]
    assert len(files) > 100
    internal = {str(p.relative_to(ROOT)): sorted(_flower_imports(p) - PUBLIC - {"flwr"})
                for p in files if p != adapter}
    assert {f: m for f, m in internal.items() if m} == {}, \
        "import these through fl_app.flower_internals (and pin them in this file)"
    assert _flower_imports(adapter) - PUBLIC, "the adapter holds the internals"


def test_the_compat_server_loop_calls_keep_their_signatures():
    assert _params(fi.fit_clients) == ["client_instructions", "max_workers", "timeout",
                                       "group_id"]
    assert _params(fi.fit_client) == ["client", "ins", "timeout", "group_id"]
    assert fi.FitResultsAndFailures is not None
    assert _params(fi.start_grid)[:3] == ["grid", "server", "config"]


def test_the_secaggplus_internals_keep_their_names():
    for key in ("STAGE", "THRESHOLD", "SOURCE_LIST", "SHARE_NUMBER", "SAMPLE_NUMBER",
                "DEAD_NODE_ID_LIST", "ACTIVE_NODE_ID_LIST"):
        assert isinstance(getattr(fi.SecAggPlusKey, key), str), key
    assert isinstance(fi.WorkflowKey.CURRENT_ROUND, str)
    assert all(isinstance(k, str) for k in (fi.MAIN_CONFIGS_RECORD, fi.MAIN_PARAMS_RECORD,
                                            fi.RECORD_KEY_CONFIGS, fi.RECORD_KEY_STATE))
    assert {"nid", "rd_seed_share_dict"} <= {f.name for f in dataclasses.fields(fi.SecAggPlusState)}
    assert _params(fi.check_configs) == ["stage", "configs"]
    for fn in ("recorddict_to_fitres", "recorddict_to_fitins", "parameters_to_arrayrecord",
               "getpropertiesins_to_recorddict", "fitres_to_recorddict", "fitins_to_recorddict"):
        assert callable(getattr(fi.recorddict_compat, fn)), fn


def test_the_run_config_parser_reads_flowers_syntax():
    assert fi.parse_config_args(["a=1 b='x'", "a=2"]) == {"a": 2, "b": "x"}
    assert fi.flatten_dict({"a": {"b": 1}}) == {"a.b": 1}


def test_the_in_memory_engine_builds_a_run_with_its_nodes():
    state, grid, mapping = fi.in_memory_engine(3)
    assert len(mapping) == 3 and grid.run.run_id in state.run_ids
    assert len(fi.engine_node_stores(mapping, grid.run)) == 3
    node = next(iter(mapping))
    assert fi.grid_client_proxy(node, grid, grid.run.run_id).node_id == node


def test_the_installed_flwr_is_one_the_internals_are_tested_with():
    minor = ".".join(flwr.__version__.split(".")[:2])
    assert minor in fi.FLWR_TESTED, (
        f"flwr {flwr.__version__}: fl_app.flower_internals is tested with {fi.FLWR_TESTED}; "
        "check every name below against the new flwr, then add it")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert "flwr[simulation]>=1.41,<2" in dependencies


def test_the_task_api_functions_keep_their_signatures():
    assert {"initial_backoff", "backoff_cap", "return_type"} <= \
        set(_params(fi.pull_and_inflate_object_from_tree))
    assert _params(fi.make_pull_object_fn_protobuf)[:3] == ["pull_object_protobuf",
                                                                   "node", "run_id"]
    assert _params(fi.push_message) == ["client", "message", "context"]
    assert _params(fi.push_task_output) == ["client", "context", "sub_status", "details"]
    assert _params(fi.make_task_heartbeat_fn_http) == ["client"]
    assert _params(fi.HeartbeatSender) == ["heartbeat_fn"]
    assert {"start", "stop", "is_running"} <= set(dir(fi.HeartbeatSender))
    assert _params(fi.install_from_fab) == ["fab_file", "install_dir", "skip_prompt"]
    assert _params(fi.get_project_dir)[:3] == ["fab_id", "fab_version", "fab_hash"]
    assert _params(fi.get_load_client_app_fn) == ["default_app_ref", "app_path",
                                                        "multi_app"]


def test_the_clients_and_interceptors_keep_their_signatures():
    assert _params(fi.RuntimeHttpClient.from_server_address) == [
        "server_address", "insecure", "root_certificates", "interceptors", "retry_invoker"]
    for method in ("AcquireTask", "PullTaskInput", "PullMessages", "PullObject",
                   "ConfirmMessageReceived", "PushMessages",
                   "PushTaskOutput", "SendTaskHeartbeat", "close"):
        assert hasattr(fi.RuntimeHttpClient, method), method
    assert _params(fi.SuperExecAuthHttpInterceptor) == ["master_secret",
                                                             "protected_methods"]
    assert _params(fi.RuntimeTokenHttpInterceptor) == ["token"]
    assert _params(fi.RuntimeVersionHttpInterceptor) == ["component_name"]
    assert {"wait_gen_factory", "recoverable_exceptions", "max_tries", "max_time"} <= \
        set(_params(fi.RetryInvoker))


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
        assert isinstance(getattr(type(fi.TaskIdentity), name), property), name
    assert fi.TaskType.CLIENT_APP == "flwr-clientapp"
    assert (fi.SubStatus.COMPLETED, fi.SubStatus.FAILED) == ("completed", "failed")
    assert int(task_api.CLIENT_APP_ERROR) == int(fi.ErrorCode.CLIENT_APP_RAISED_EXCEPTION)


def test_the_supernode_takes_the_flags_deploy_gives_it():
    args = _parse_args_run_supernode().parse_args(
        ["--superlink", "127.0.0.1:9092", "--isolation", "process",
         "--superexec-auth-secret-file", "/tmp/secret"])
    assert args.isolation == "process" and args.superexec_auth_secret_file == "/tmp/secret"
