"""The one reader of data files, for a simulation's `dataset=<path>` and a node's `data-path`.

Formats:
* `.npz`: arrays `x` (features, shape `(n, ...)`) and `y` (targets, `(n,)` or one
  column per label or value). `label-column` does not apply.
* `.csv` and `.parquet`: one row per example; the `label-column` column holds the
  target (several columns, comma-separated, for multi-label or multi-value targets);
  every other column is a feature, in order. A `.csv` has a header row.

Every column must be numeric; empty cells read as NaN (the quality checks of
`fl_app.data.quality` then find them). Features are used as given: scale them the way the
model expects. Errors are DataErrors naming the file and, for a bad column, its first
bad row (counted from 0, the header excluded).

`task='auto'` infers the task from the targets with scikit-learn's `type_of_target`:
non-integer values are a regression, two values within 0/1 binary, other integers
multiclass (labels `0..K-1`), 0/1 columns multi-label. Integer-valued regression
targets (counts, years) therefore need `task='regression'`, or a user model compiled with a
regression loss, which settles the task before this runs (`fl_app.ml.task`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.utils.multiclass import type_of_target

from fl_app.data.types import FILE_SUFFIXES, TASKS, DataError, DataSpec, is_data_file
from fl_app.schema import did_you_mean

AUTO = "auto"
TASK_CHOICES = (AUTO, *TASKS)


def _read_npz(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        missing = {"x", "y"} - set(archive.files)
        if missing:
            raise DataError(f"data file {path} lacks array(s) {sorted(missing)}; it has "
                            f"{sorted(archive.files)} (expected 'x' features and 'y' targets)")
        x, y = archive["x"], archive["y"]
    for name, array in (("x", x), ("y", y)):
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise DataError(f"data file {path}: array '{name}' is not numeric "
                            f"(dtype {array.dtype})")
    return x, y


def _read_frame(path: Path):  # -> pandas.DataFrame (pandas is imported only when needed)
    import pandas as pd

    if path.suffix.lower() == ".csv":
        return pd.read_csv(path)
    try:
        return pd.read_parquet(path)
    except ImportError as err:
        raise DataError(f"data file {path}: reading .parquet needs pyarrow "
                        f"(pip install pyarrow): {err}") from err


def _numeric(frame, columns: list[str], path: Path) -> np.ndarray:
    """The columns as float64; a non-numeric cell raises naming its column and row."""
    import pandas as pd

    out = np.empty((len(frame), len(columns)))
    for j, name in enumerate(columns):
        values = pd.to_numeric(frame[name], errors="coerce")
        bad = values.isna().to_numpy() & frame[name].notna().to_numpy()
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(f"data file {path}: column {name!r} is not numeric, first at row "
                            f"{row} ({int(bad.sum())} such row(s))")  # never the value: private
        out[:, j] = values.to_numpy(dtype=np.float64, na_value=np.nan)
    return out


def _looks_like_data(name: str) -> bool:
    try:
        float(name)
    except ValueError:
        return False
    return True


def _describe_columns(names: list[str], target: str) -> str:
    """The header's names with a "did you mean"; a header that looks like a row of numbers
    is data (a file without a header row), so it is counted, never quoted."""
    if any(_looks_like_data(name) for name in names):
        return (f"its first row ({len(names)} values) looks like data, not column names: "
                "the file needs a header row")
    return f"its columns: {names}{did_you_mean(target, names, n=3)}"


def _read_table(path: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    frame = _read_frame(path)
    names = [str(c) for c in frame.columns]
    targets = [c.strip() for c in label_column.split(",")]
    for target in targets:
        if target not in names:
            raise DataError(f"data file {path} has no label column {target!r} (run-config "
                            f"key label-column); {_describe_columns(names, target)}")
    features = [c for c in names if c not in targets]
    if not features:
        raise DataError(f"data file {path} has no feature columns besides {targets}")
    frame.columns = names
    y = _numeric(frame, targets, path)
    return _numeric(frame, features, path), (y[:, 0] if len(targets) == 1 else y)


def read_data_file(path_str: str, label_column: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """Features and targets of a `.npz`, `.csv` or `.parquet` file, as stored.

    Raises DataError naming the file for a missing, unsupported, unreadable or
    ill-formed file (a missing label column, a non-numeric column).
    """
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if not is_data_file(path):
        raise DataError(f"data file {path}: unsupported format '{path.suffix}' "
                        f"(use {', '.join(FILE_SUFFIXES)})")
    reader = _read_npz if path.suffix.lower() == ".npz" else _read_table
    try:
        x, y = reader(path, label_column)
    except DataError:
        raise
    except Exception as err:  # numpy, pandas and pyarrow raise many kinds for a corrupt file
        # The reader's message may quote the file's bytes: name the kind of failure only.
        raise DataError(f"data file {path} is unreadable ({type(err).__name__})") from err
    if len(x) != len(y):
        raise DataError(f"data file {path}: {len(x)} feature rows but {len(y)} targets")
    if len(y) == 0:
        raise DataError(f"data file {path} holds no examples")
    return x, y


def file_stamp(value: str) -> tuple[int, int, int] | None:
    """(modification time in ns, size, inode) of the file `value` names, None if it names
    no file: part of a cache key, so a file rewritten or replaced on disk is loaded again."""
    path = Path(value).expanduser()
    try:
        stat = path.stat()
    except (OSError, ValueError):
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino) if path.is_file() else None


MAX_CLASSES = 10_000  # more "classes" than this is a mislabelled or continuous target


def _auto_task(y: np.ndarray, path: str) -> str:
    """The task `type_of_target` sees in the finite targets (see the module docstring)."""
    finite = y[np.isfinite(y.reshape(len(y), -1)).all(axis=1)]
    kind = type_of_target(finite) if len(finite) else "unknown"
    if kind in ("continuous", "continuous-multioutput"):
        return "regression"
    if kind == "binary" and np.isin(finite, (0, 1)).all():
        return "binary"
    if kind in ("binary", "multiclass"):
        return "multiclass"
    if kind == "multilabel-indicator":
        return "multilabel"
    raise DataError(f"data file {path}: cannot tell the task of targets of shape {y.shape} "
                    f"(scikit-learn's type_of_target: {kind!r}); set run-config key task")


def infer_spec(x: np.ndarray, y: np.ndarray, task: str, path: str) -> DataSpec:
    """The DataSpec of a dataset file: its feature shape and the (given or inferred) task's
    classes (max label + 1), labels (columns) or values (columns)."""
    task = _auto_task(y, path) if task == AUTO else task
    columns = 1 if y.ndim == 1 else int(np.prod(y.shape[1:]))
    shape = tuple(int(d) for d in x.shape[1:])
    if task == "regression":
        return DataSpec(shape, 0, task, columns)
    if task == "multilabel":
        return DataSpec(shape, columns, task)
    if columns != 1:
        raise DataError(f"data file {path}: task {task!r} needs one target column, "
                        f"got targets of shape {y.shape}")
    if task == "binary":
        return DataSpec(shape, 2, task)
    with np.errstate(invalid="ignore"):
        labels = y[np.isfinite(y) & (y >= 0) & (np.mod(y, 1) == 0)]
    if len(labels) == 0 or labels.max() < 1:
        raise DataError(f"data file {path}: a multiclass target needs integer labels "
                        "0..K-1 of at least two classes")
    num_classes = int(labels.max()) + 1
    if num_classes > MAX_CLASSES:
        raise DataError(f"data file {path}: its labels would need more than {MAX_CLASSES} "
                        "classes (a value is private, so it is not shown): labels must be "
                        "class indices 0..K-1; for a continuous target set run-config key "
                        "task='regression'")
    return DataSpec(shape, num_classes, task)
