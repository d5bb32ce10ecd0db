"""What a node trains on: its own file in deployment, its partition in simulation."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from fl_app.data.files import file_stamp
from fl_app.data.node_files import load_node_file
from fl_app.data.sources import ClientData, DataError, data_spec, load_partition
from fl_app.data.types import DataSettings
from fl_app.schema import Scalar

NODE_FILE_RUNS = 2  # data settings whose node file stays loaded in a long-lived process
_node_files: OrderedDict[tuple[Any, ...], ClientData] = OrderedDict()


def _node_file(path: str, settings: DataSettings) -> ClientData:
    """The node's own data file loaded and checked for `settings`, kept for the last
    `NODE_FILE_RUNS` data settings (a deployment node's warm ClientApp process serves every
    message of a run: its file is read once); a file changed on disk is read again."""
    key = (path, file_stamp(path), settings)
    if key not in _node_files:
        _node_files[key] = load_node_file(path, data_spec(settings), settings)
        while len(_node_files) > NODE_FILE_RUNS:
            _node_files.popitem(last=False)
    _node_files.move_to_end(key)
    return _node_files[key]


def load_client(settings: DataSettings, node_config: Mapping[str, Scalar]) -> ClientData:
    """A client's data: its node's own `data-path` file in deployment (`_node_file`), else
    its partition."""
    if "data-path" in node_config:
        return _node_file(str(node_config["data-path"]), settings)
    try:
        partition_id = int(node_config["partition-id"])
        num_partitions = int(node_config["num-partitions"])
    except KeyError as err:
        raise DataError(
            f"node-config has neither 'data-path' nor {err.args[0]!r}: in deployment start the "
            "SuperNode with --node-config \"data-path='/path/to/data.npz'\""
        ) from None
    return load_partition(settings, partition_id, num_partitions)
