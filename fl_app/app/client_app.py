"""The Flower ClientApp: each node's data and the shared trainer behind a `KerasClient`."""

from __future__ import annotations

from collections.abc import Mapping

from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import Context, Scalar

from fl_app.app.config import resolve
from fl_app.client.faults import with_faults
from fl_app.client.keras_client import KerasClient
from fl_app.data.node_data import load_client
from fl_app.data.sources import DataError, data_spec
from fl_app.ml.trainer import trainer_for
from fl_app.schema import RunConfig


def client_for(cfg: RunConfig, node_config: Mapping[str, Scalar]) -> NumPyClient:
    """Build the client for one node: its data (partition or own file) and the shared trainer.

    In simulation, the fault-injection and attack keys may make it a misbehaving client
    (see `fl_app.client.faults`).
    """
    data = load_client(cfg, node_config)
    trainer = trainer_for(cfg, data_spec(cfg))
    key = int(node_config["partition-id"]) if "partition-id" in node_config else data.key
    return with_faults(KerasClient(trainer, data, cfg, seed=int(cfg["seed"]), client_key=key),
                       cfg, node_config)


def make_client_app(fixed_config: RunConfig | None = None) -> ClientApp:
    """A ClientApp; with `fixed_config` it ignores `context.run_config` (for run_simulation)."""

    def client_fn(context: Context) -> Client:
        cfg = fixed_config if fixed_config is not None else resolve(context.run_config)
        try:
            client = client_for(cfg, context.node_config)
        except DataError as err:  # the server sees only this message: name the node
            raise DataError(f"node {context.node_id}: {err}") from err
        return client.to_client()

    return ClientApp(client_fn=client_fn)


app = make_client_app()
