"""Checks of a client's data before training, and the report each client sends the server.

`check_client_data` runs on every client's data (a simulation partition, a node's own
file) and on a file dataset's pool before it is split:

* Always errors: features that do not fit the model's input (width or row count),
  targets of the wrong shape for the task, non-numeric arrays, and data that is empty
  (also after dropping rows).
* Row problems: non-finite features (reason `nonfinite`); non-finite, non-integer or
  out-of-range targets, or multi-label values other than 0/1 (reason `target`). With the
  `data-cleaning` policy `error` (default) they raise a DataError naming where the data
  came from, the problem, its first bad row (counted from 0, a file's header excluded;
  within a partition, its own rows) and how many rows have it; with `drop-rows` the rows
  are removed and counted per reason.
* Warnings only: training data of a single class, and extreme imbalance (the majority
  class has more than `max-class-imbalance` times the examples of the minority class;
  0 disables). A warning holds counts only, never a class label (it reaches the server).
  Skewed, even one-class clients are what non-IID federated learning is about
  (`partitioner='pathological'` with one class per client must keep working), so these
  never stop a run: they are logged and reported.

The report reaches the server as fit metrics (`QualityReport.as_metrics`, keys starting
with `fl_app.wire.DATA_QUALITY_PREFIX`; the warnings as one string of at most
`fl_app.wire.MAX_DATA_WARNINGS_CHARS` characters); the server only records them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.common.logger import log

from fl_app.data.types import DataError, DataSpec, as_split
from fl_app.schema import Scalar
from fl_app.wire import DATA_QUALITY_PREFIX, MAX_DATA_WARNINGS_CHARS

POLICIES = ("error", "drop-rows")
REASONS = ("nonfinite", "target")  # why a row is dropped: its features, its target


@dataclass(frozen=True)
class QualityReport:
    """What the checks found in one client's data: rows kept, rows dropped per reason,
    warnings (single class, imbalance)."""

    rows: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    warnings: tuple[str, ...] = ()

    def as_metrics(self) -> dict[str, Scalar]:
        """The report as Flower fit metrics: `data_rows`, `data_dropped_<reason>`,
        `data_warnings` (empty when there are none; cut to `MAX_DATA_WARNINGS_CHARS`)."""
        warnings = "; ".join(self.warnings)
        if len(warnings) > MAX_DATA_WARNINGS_CHARS:
            warnings = warnings[:MAX_DATA_WARNINGS_CHARS - 3] + "..."
        return {f"{DATA_QUALITY_PREFIX}rows": self.rows,
                **{f"{DATA_QUALITY_PREFIX}dropped_{reason}": self.dropped.get(reason, 0)
                   for reason in REASONS},
                f"{DATA_QUALITY_PREFIX}warnings": warnings}


def _fit_features(x: np.ndarray, n: int, spec: DataSpec, where: str) -> np.ndarray:
    """Features reshaped to the model's input; a width or row-count mismatch is an error."""
    if not np.issubdtype(x.dtype, np.number) and x.dtype != bool:
        raise DataError(f"{where}: features are not numeric (dtype {x.dtype})")
    if len(x) != n:
        raise DataError(f"{where}: {len(x)} feature rows but {n} targets")
    want = int(np.prod(spec.input_shape))
    if int(np.prod(x.shape[1:])) != want:
        raise DataError(f"{where}: feature dimension {x.shape[1:]} does not match the model's "
                        f"input {spec.input_shape} ({want} values per example)")
    return np.asarray(x, dtype=np.float64).reshape((n, *spec.input_shape))


def _fit_targets(y: np.ndarray, spec: DataSpec, where: str) -> np.ndarray:
    """Targets as the task needs them: 1-D classes, or one column per label or value
    (1-D for a single regression value)."""
    if not np.issubdtype(y.dtype, np.number) and y.dtype != bool:
        raise DataError(f"{where}: targets are not numeric (dtype {y.dtype})")
    columns = spec.num_classes if spec.task == "multilabel" else spec.num_targets
    if spec.task in ("multiclass", "binary"):
        columns = 1
    table = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    if y.ndim not in (1, 2) or table.shape[1] != columns:
        raise DataError(f"{where}: targets of shape {y.shape} do not fit {spec.describe()} "
                        f"({columns} target column(s) per example)")
    return table[:, 0] if columns == 1 and spec.task != "multilabel" else table


def _bad_targets(y: np.ndarray, spec: DataSpec) -> tuple[np.ndarray, str]:
    """Which rows' targets the model cannot use, and what is wrong with them."""
    rows = y.reshape(len(y), -1)
    finite = np.isfinite(rows).all(axis=1)
    if spec.task == "regression":
        return ~finite, "targets are NaN or infinite"
    if spec.task == "multilabel":
        return ~np.isin(rows, (0, 1)).all(axis=1), "multi-label targets must be 0 or 1"
    with np.errstate(invalid="ignore"):
        valid = finite & (np.mod(y, 1) == 0) & (y >= 0) & (y < spec.num_classes)
    return ~valid, (f"targets outside the model's classes 0..{spec.num_classes - 1} "
                    "(or not integers)")


def _class_warnings(y: np.ndarray, spec: DataSpec, max_imbalance: float) -> tuple[str, ...]:
    """Single-class and imbalance warnings for single-label class targets: row counts
    only, no class label (the server sees them)."""
    if spec.task not in ("multiclass", "binary"):
        return ()
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) == 1:
        return ("single class",)
    ratio = counts.max() / counts.min()
    if max_imbalance > 0 and ratio > max_imbalance:
        return (f"class imbalance {ratio:.0f}:1 (largest class {counts.max()} rows, "
                f"smallest {counts.min()})",)
    return ()


def cleaning(cfg: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """The run's `data-cleaning` and `max-class-imbalance` as `check_client_data` keywords."""
    return {"policy": cfg["data-cleaning"], "max_imbalance": cfg["max-class-imbalance"]}


def check_client_data(x: np.ndarray, y: np.ndarray, spec: DataSpec, where: str,
                      policy: str = "error", max_imbalance: float = 50.0,
                      ) -> tuple[np.ndarray, np.ndarray, QualityReport]:
    """Check one client's data against the model (see the module docstring).

    Returns the (possibly cleaned) features as float32 in the model's input shape, the
    targets as the task keeps them (int32 classes or 0/1 labels, float32 values), and
    the report. Raises DataError naming `where` for what cannot be trained on.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown data-cleaning policy {policy!r}; use one of {POLICIES}")
    if len(y) == 0:
        raise DataError(f"{where} holds no examples")
    y = _fit_targets(np.asarray(y), spec, where)
    x = _fit_features(np.asarray(x), len(y), spec, where)
    bad_target, target_problem = _bad_targets(y, spec)
    nonfinite = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    bad = {"nonfinite": nonfinite, "target": bad_target & ~nonfinite}  # each row counted once
    problems = {"nonfinite": "features are NaN or infinite", "target": target_problem}
    for reason, rows in bad.items():
        if policy == "error" and rows.any():
            raise DataError(f"{where}: {problems[reason]} in {int(rows.sum())} row(s), first "
                            f"at row {int(np.argmax(rows))} (data-cleaning='drop-rows' drops "
                            "such rows)")
    keep = ~(bad["nonfinite"] | bad["target"])
    if not keep.any():
        raise DataError(f"{where}: no examples left after dropping {len(y)} bad row(s)")
    split = as_split(x[keep], y[keep], spec.task)
    warnings = _class_warnings(split.y, spec, max_imbalance)
    for warning in warnings:
        log(WARNING, "%s: %s", where, warning)
    dropped = {reason: int(rows.sum()) for reason, rows in bad.items()}
    if any(dropped.values()):
        log(WARNING, "%s: dropped %s", where, dropped)
    return split.x, split.y, QualityReport(len(split), dropped, warnings)
