"""A SuperNode's own data file (node-config `data-path`), checked against the model.

Schema:
* `.npz`: arrays `x` (float features, shape `(n, *input_shape)` or `(n, prod(input_shape))`)
  and `y` (integer labels in `0..num_classes-1`).
* `.csv`: a header row; the column `label` holds the integer label, every other column
  is a feature (in order).

Features are used as given, so scale them the way the model expects (digits: 0..1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fl_app.data.sources import ClientData, DataError, DataSpec, Split, split_train_val
from fl_app.schema import RunConfig


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        missing = {"x", "y"} - set(archive.files)
        if missing:
            raise DataError(f"data file {path} lacks array(s) {sorted(missing)}; it has "
                            f"{sorted(archive.files)} (expected 'x' features and 'y' labels)")
        return archive["x"], archive["y"]


def _read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    table = np.genfromtxt(path, delimiter=",", names=True, dtype=np.float64)
    names = table.dtype.names or ()
    if "label" not in names:
        raise DataError(f"data file {path} has no 'label' column (columns: {list(names)})")
    features = [n for n in names if n != "label"]
    x = np.stack([np.atleast_1d(table[n]) for n in features], axis=1)
    return x, np.atleast_1d(table["label"])


def _check_labels(y: np.ndarray, spec: DataSpec, path: Path) -> np.ndarray:
    if y.ndim != 1:
        raise DataError(f"data file {path}: labels must be one-dimensional, got shape {y.shape}")
    if not np.all(np.isfinite(y)) or not np.all(np.equal(np.mod(y, 1), 0)):
        raise DataError(f"data file {path}: labels must be integers")
    bad = (y < 0) | (y >= spec.num_classes)
    if bad.any():
        raise DataError(
            f"data file {path}: {int(bad.sum())} label(s) outside the model's classes "
            f"0..{spec.num_classes - 1} (e.g. {int(y[bad][0])})"
        )
    return y.astype(np.int32)


def _check_features(x: np.ndarray, n: int, spec: DataSpec, path: Path) -> np.ndarray:
    if len(x) != n:
        raise DataError(f"data file {path}: {len(x)} feature rows but {n} labels")
    want = int(np.prod(spec.input_shape))
    if int(np.prod(x.shape[1:])) != want:
        raise DataError(
            f"data file {path}: feature dimension {x.shape[1:]} does not match the model's "
            f"input {spec.input_shape} ({want} values per example)"
        )
    x = np.asarray(x, dtype=np.float32).reshape((n, *spec.input_shape))
    if not np.all(np.isfinite(x)):
        raise DataError(f"data file {path}: features contain NaN or infinite values")
    return x


def load_node_file(path_str: str, spec: DataSpec, cfg: RunConfig) -> ClientData:
    """Read and check a node's `.npz`/`.csv` file; raise DataError naming the file at fault."""
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise DataError(f"data file {path} does not exist (node-config data-path)")
    readers = {".npz": _read_npz, ".csv": _read_csv}
    if path.suffix not in readers:
        raise DataError(f"data file {path}: unsupported format '{path.suffix}' (use .npz or .csv)")
    try:
        x, y = readers[path.suffix](path)
    except DataError:
        raise
    except Exception as err:  # numpy raises many kinds for a corrupt file
        raise DataError(f"data file {path} is unreadable: {type(err).__name__}: {err}") from err
    if len(y) < 1:
        raise DataError(f"data file {path} holds no examples")
    y = _check_labels(np.asarray(y), spec, path)
    x = _check_features(np.asarray(x), len(y), spec, path)
    train, val = split_train_val(Split(x, y), cfg, salt=0)
    return ClientData(train, val, f"file {path}")
