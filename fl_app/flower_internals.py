"""Every Flower internal this project uses, in one place, pinned to the flwr it is tested with.

Flower's public API is what its packages export (`flwr.app`, `flwr.client`, `flwr.clientapp`,
`flwr.common`, `flwr.server`, `flwr.serverapp`, `flwr.simulation`, `flwr.server.strategy`,
`flwr.server.workflow`, `flwr.client.mod`) and the modules every custom strategy imports
(`flwr.server.client_manager`, `flwr.server.client_proxy`, `flwr.server.criterion`,
`flwr.common.typing`, `flwr.common.logger`, `flwr.server.strategy.aggregate`). Anything
else is internal and unversioned, and is imported only here (`tests/test_architecture.py`
refuses it elsewhere); `tests/test_flower_internals.py` pins every name and signature below
and the flwr versions they were checked against (`FLWR_TESTED`), so a flwr upgrade that
moves or reshapes one fails there, naming it, not in a run or a deployment.

Who uses what:

* the compat server loop (`fl_app.server.runner`): `fit_client`, `fit_clients` and
  `FitResultsAndFailures` of `flwr.server.server`, to stream a round's replies as they come;
* SecAgg+ on the legacy path (`fl_app.server.secagg`, `fl_app.client.secure_mod`,
  `fl_app.client.node_policy`): the workflow's record keys, the client mod's state and
  checks, and the record/compat converters; its `quantize` (`scripts.bench.zk_bound_proof`);
* the message-API loop (`fl_app.server.fedbuff_loop`): `TaskIdentity`, `SUPERLINK_NODE_ID`;
* ClientApp mods (`fl_app.client`, `fl_app.app.client_app`, `fl_app.cli.simulate`): the
  `Mod` and `ClientAppCallable` types;
* run-config strings (`fl_app.cli.simulate`, `fl_app.client.local_work`, `deploy`): Flower's
  own parser of `--run-config` and `--node-config` and the pyproject reader;
* a deployment node's executor (`fl_app.worker.task_api`, `executor`, `warm_clientapp`):
  Flower's task API, as `flwr/supercore/superexec/run_superexec.py` and
  `flwr/supernode/runtime/run_clientapp.py` use it;
* `deploy.prepare`: the SuperLink's and SuperNode's default ports;
* `scripts.bench.scale_clients`: Flower's in-memory link state, built as `run_simulation` builds it
  (`in_memory_engine`; imported when called, as only that benchmark needs it).
"""

from __future__ import annotations

from typing import Any

# a deployment node's executor: Flower's task API
from flwr.app.error import Error
from flwr.cli.install import install_from_fab

# SecAgg+ on the legacy path
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState, check_configs
from flwr.clientapp.client_app import ClientApp

# message-API loops, mods, run-config strings
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.config import (
    flatten_dict,
    get_project_config,
    get_project_dir,
    parse_config_args,
)
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode, SubStatus
from flwr.common.secure_aggregation.quantization import quantize
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Stage,
)
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggPlusKey
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    fab_from_proto,
    message_from_proto,
    message_to_proto,
    run_from_proto,
)
from flwr.compat.common import recorddict_compat
from flwr.proto.message_pb2 import Context as ContextProto  # pylint: disable=E0611
from flwr.proto.message_pb2 import Message as MessageProto  # pylint: disable=E0611
from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
    AcquireTaskRequest,
    PullAppMessagesRequest,
    PullTaskInputRequest,
)
from flwr.server.compat import start_grid

# the compat server loop
from flwr.server.server import FitResultsAndFailures, fit_client, fit_clients
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.supercore.constant import (
    SUPERLINK_UVICORN_DEFAULT_PORT,
    SUPERNODE_UVICORN_DEFAULT_PORT,
    TaskType,
)
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry.retry_invoker import RetryInvoker, exponential
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

FLWR_TESTED = ("1.42",)
"""The flwr minor versions every name here was checked against (1.41 served the same names
for all but the task API, whose HTTP transport came with 1.42)."""


def in_memory_engine(num_nodes: int) -> tuple[Any, Any, dict[int, int]]:
    """Flower's in-memory link state with a run and `num_nodes` nodes, made as
    `flwr.simulation.run_simulation` makes them: (state, the ServerApp's `InMemoryGrid` on
    it, node id -> partition). For `scripts.bench.scale_clients`, which measures Flower's engine."""
    from flwr.common.constant import RUN_ID_NUM_BYTES, TASK_ID_NUM_BYTES
    from flwr.proto.task_pb2 import Task  # pylint: disable=E0611
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.server.superlink.linkstate.in_memory_linkstate import (
        InMemoryLinkState,
        RunRecord,
    )
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME, NOOP_FEDERATION_ID
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.superlink.federation import NoOpFederationManager
    from flwr.superlink.grid import InMemoryGrid

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, NoOpFederationManager(),
                               ObjectStoreFactory())
    state = factory.state()
    if not isinstance(state, InMemoryLinkState):  # FLWR_IN_MEMORY_DB_NAME makes one
        raise TypeError(f"expected Flower's in-memory link state, got {type(state).__name__}")
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.federation_id = NOOP_FEDERATION_ID
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    state.run_ids[run.run_id] = RunRecord(run=run)
    state.task_store[run.primary_task_id] = Task(task_id=run.primary_task_id, run_id=run.run_id)
    TaskIdentity.task_id, TaskIdentity.run_id = 1, run.run_id  # as run_simulation sets them
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    mapping = _register_nodes(num_nodes, factory)
    grid = InMemoryGrid(factory)
    grid.set_run(run)
    return state, grid, mapping


def engine_node_stores(mapping: dict[int, int], run: Any) -> Any:
    """The simulation engine's per-node run-info stores, as `start_vce` registers them."""
    from flwr.server.superlink.fleet.vce.vce_api import _register_node_info_stores

    return _register_node_info_stores(mapping, run)


def grid_client_proxy(node_id: int, grid: Any, run_id: int) -> Any:
    """Flower's `GridClientProxy`, as the compat server registers each node."""
    from flwr.server.compat.grid_client_proxy import GridClientProxy

    return GridClientProxy(node_id=node_id, grid=grid, run_id=run_id)


__all__ = [
    "AcquireTaskRequest", "ClientApp", "ClientAppCallable", "ContextProto", "Error",
    "ErrorCode", "FLWR_TESTED", "Fab", "FitResultsAndFailures", "HeartbeatSender",
    "MAIN_CONFIGS_RECORD", "MAIN_PARAMS_RECORD", "MessageProto", "Mod", "Node",
    "ProtobufClientInterceptor", "PullAppMessagesRequest", "PullTaskInputRequest",
    "RECORD_KEY_CONFIGS", "RECORD_KEY_STATE", "RetryInvoker", "Run", "RuntimeHttpClient",
    "RuntimeTokenHttpInterceptor", "RuntimeVersionHttpInterceptor", "SUPERLINK_NODE_ID",
    "SUPERLINK_UVICORN_DEFAULT_PORT", "SUPERNODE_UVICORN_DEFAULT_PORT", "SecAggPlusKey",
    "SecAggPlusState", "Stage", "SubStatus", "SuperExecAuthHttpInterceptor", "TaskIdentity",
    "TaskType", "WorkflowKey", "check_configs", "context_from_proto", "context_to_proto",
    "engine_node_stores", "exponential", "fab_from_proto", "fit_client", "fit_clients",
    "flatten_dict", "get_load_client_app_fn", "get_project_config", "get_project_dir",
    "grid_client_proxy", "in_memory_engine", "install_from_fab",
    "make_confirm_message_received_fn_protobuf", "make_pull_object_fn_protobuf",
    "make_task_heartbeat_fn_http", "message_from_proto", "message_to_proto",
    "parse_config_args", "pull_and_inflate_object_from_tree", "push_message",
    "push_task_output", "quantize", "recorddict_compat", "run_from_proto", "start_grid",
]
