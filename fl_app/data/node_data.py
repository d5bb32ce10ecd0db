"""What a node trains on: its own file in deployment, its partition in simulation."""

from __future__ import annotations

from collections.abc import Mapping

from fl_app.data.node_files import load_node_file
from fl_app.data.sources import ClientData, DataError, data_spec, load_partition
from fl_app.schema import RunConfig, Scalar


def load_client(cfg: RunConfig, node_config: Mapping[str, Scalar]) -> ClientData:
    """A client's data: its node's own `data-path` file in deployment, else its partition."""
    if "data-path" in node_config:
        return load_node_file(str(node_config["data-path"]), data_spec(cfg), cfg)
    try:
        partition_id = int(node_config["partition-id"])
        num_partitions = int(node_config["num-partitions"])
    except KeyError as err:
        raise DataError(
            f"node-config has neither 'data-path' nor {err.args[0]!r}: in deployment start the "
            "SuperNode with --node-config \"data-path='/path/to/data.npz'\""
        ) from None
    return load_partition(cfg, partition_id, num_partitions)
