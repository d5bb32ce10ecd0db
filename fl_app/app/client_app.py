"""The Flower ClientApp: each node's data and the shared trainer behind a `KerasClient`.

Importing this module imports no TensorFlow. A node whose node config names a worker
(`worker-socket`, see `fl_app.app.worker_link`) forwards each message to that long-lived
process, which keeps TensorFlow, the node's data and the compiled model across messages;
any other node (simulation, `flwr run .`, a plain SuperNode) trains in this process, as
`client_for` builds it.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.client import Client, NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import Context, Scalar

from fl_app.app.worker_link import WorkerAddress, WorkerClient
from fl_app.schema import RunConfig


def client_for(cfg: RunConfig, node_config: Mapping[str, Scalar]) -> NumPyClient:
    """Build the client for one node in this process: its data (partition or own file) and
    the shared trainer (see `fl_app.app.local_client`)."""
    from fl_app.app.local_client import client_for as build

    return build(cfg, node_config)


def make_client_app(fixed_config: RunConfig | None = None,
                    node_config: Mapping[str, Scalar] | None = None) -> ClientApp:
    """A ClientApp; with `fixed_config` it ignores `context.run_config` (for run_simulation),
    and `node_config` adds to every node's own (the simulation engine's is fixed; this is
    how run_simulation gives the simulated nodes their key file, which the server never
    sees)."""
    extra = dict(node_config or {})

    def client_fn(context: Context) -> Client:
        node = {**context.node_config, **extra}
        address = WorkerAddress.from_node_config(node)
        if address is not None and fixed_config is None:
            return WorkerClient(address, context.run_config, node,
                                f"node {context.node_id}").to_client()
        from fl_app.app.config import resolve
        from fl_app.data.types import DataError

        cfg = fixed_config if fixed_config is not None else resolve(context.run_config)
        try:
            client = client_for(cfg, node)
        except DataError as err:  # the server sees only this message: name the node
            raise DataError(f"node {context.node_id}: {err}") from err
        return client.to_client()

    return ClientApp(client_fn=client_fn)


app = make_client_app()
