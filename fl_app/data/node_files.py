"""A SuperNode's own data file (node-config `data-path`), checked against the model.

The file is read by `fl_app.data.files` (`.npz` with arrays `x` and `y`; `.csv` or
`.parquet` with the `label-column` target and feature columns) and checked by
`fl_app.data.quality` against the run's DataSpec, which the server's `dataset` defines:
the same files work as a simulation's `dataset=<path>`.

Features are used as given, so scale them the way the model expects (digits: 0..1).
"""

from __future__ import annotations

from pathlib import Path

from fl_app.data.files import read_data_file
from fl_app.data.quality import check_client_data, cleaning
from fl_app.data.sources import ClientData, DataSpec, Split, split_train_val
from fl_app.data.types import DataSettings


def load_node_file(path_str: str, spec: DataSpec, settings: DataSettings) -> ClientData:
    """Read and check a node's data file; raise DataError naming the file at fault."""
    path = Path(path_str).expanduser()
    x, y = read_data_file(str(path), settings.label_column)
    x, y, quality = check_client_data(x, y, spec, f"data file {path}", **cleaning(settings))
    train, val = split_train_val(Split(x, y), settings, salt=0)
    return ClientData(train, val, f"file {path}", quality)
