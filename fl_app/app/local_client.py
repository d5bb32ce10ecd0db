"""The in-process client: a node's data and the process-wide trainer behind a `KerasClient`.

This is what trains, in the ClientApp's process: a simulation's worker, a node executor's
warm ClientApp process (`fl_app.worker.executor`), or a fresh one per message under Flower's own
SuperExec. It imports TensorFlow.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from flwr.client import NumPyClient
from flwr.common import RecordDict

from fl_app.client.adaptive_work import AdaptiveWork
from fl_app.client.faults import FaultSettings, with_faults
from fl_app.client.homomorphic import with_encryption
from fl_app.client.keras_client import ClientSettings, KerasClient
from fl_app.client.local_work import WorkSettings, work_for
from fl_app.client.node_policy import NodePolicy, check_sources, public_client_key
from fl_app.client.timing import TimedClient
from fl_app.data.node_data import load_client
from fl_app.data.sources import ClientData, data_spec
from fl_app.data.types import DataSettings
from fl_app.ml.trainer import TrainSettings, trainer_for
from fl_app.schema import RunConfig, Scalar


def client_with(cfg: RunConfig, node_config: Mapping[str, Scalar],
                data: ClientData, run_id: int = 0, state: RecordDict | None = None
                ) -> NumPyClient:
    """The client for one node on already loaded `data`, with the trainer shared by the
    process's clients of run `run_id` (Flower's run id).

    The node's local work (epochs, batch size, time budget) comes from its node-config
    (`fl_app.client.local_work`); with `round-time-budget` it adapts its work to the
    budget, its measured speed kept in `state` (the node's `context.state`; a fresh one
    if None: `fl_app.client.adaptive_work`). In simulation, the fault-injection and attack keys may
    make it a misbehaving client (see `fl_app.client.faults`); with
    `homomorphic-encryption=ckks` its replies are encrypted with the key file named in its
    node config (`fl_app.client.homomorphic`).
    """
    spec = data_spec(DataSettings.from_config(cfg))
    trainer = trainer_for(TrainSettings.from_config(cfg), spec, run_id)
    key = int(node_config["partition-id"]) if "partition-id" in node_config else data.key
    work_settings = WorkSettings.from_config(cfg)
    work = work_for(work_settings, node_config, key, f"node-config of {data.source}")
    budget = work_settings.round_time_budget
    adaptive = AdaptiveWork(budget, RecordDict() if state is None else state) if budget else None
    keras_client = KerasClient(trainer, data, ClientSettings.from_config(cfg), client_key=key,
                               work=work, public_key=public_client_key(node_config, data.source),
                               adaptive=adaptive)
    client = with_faults(keras_client, FaultSettings.from_config(cfg), node_config)
    return with_encryption(client, cfg, node_config)


def client_for(cfg: RunConfig, node_config: Mapping[str, Scalar],
               load: Callable[[], ClientData] | None = None, run_id: int = 0,
               state: RecordDict | None = None) -> NumPyClient:
    """Build the client for one node: its data (`load()`; by default loaded from its
    partition or own file), run `run_id`'s shared trainer and the node's `state`
    (`client_with`); its fit metrics say how long
    each took (`fl_app.client.timing`). The node's `allow-models`/`allow-data` are checked
    first (`fl_app.client.node_policy`): this is where a node imports and reads them."""
    check_sources(NodePolicy.from_node_config(node_config), cfg)
    start = time.perf_counter()
    data = load() if load is not None else load_client(DataSettings.from_config(cfg), node_config)
    loaded = time.perf_counter()
    client = client_with(cfg, node_config, data, run_id, state)
    return TimedClient(client, {"data": loaded - start, "model": time.perf_counter() - loaded})
