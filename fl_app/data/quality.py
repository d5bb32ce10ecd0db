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

The report reaches the server as fit metrics, numbers only (`QualityReport.as_metrics`,
keys starting with `fl_app.wire.DATA_QUALITY_PREFIX`: the counts, and a warning's numbers,
`single_class` or `largest_class` and `smallest_class`, only when it applies), so an
"average every metric" aggregator of a Flower user's own server can take them; the server
only records them, with the warnings' text made from those numbers (`warning_text`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import TypedDict

import numpy as np
from flwr.common.logger import log
from flwr.common.typing import Scalar as MetricValue

from fl_app.data.types import DataError, DataSettings, DataSpec, as_split
from fl_app.schema import Scalar
from fl_app.wire import DATA_QUALITY_PREFIX

POLICIES = ("error", "drop-rows")
REASONS = ("nonfinite", "target")  # why a row is dropped: its features, its target


FINDINGS = ("single_class", "largest_class", "smallest_class")
"""The numbers a class warning is made of (`warning_text`)."""


def warning_text(findings: Mapping[str, MetricValue]) -> tuple[str, ...]:
    """The warnings that a report's `FINDINGS` make: `single class`, or `class imbalance
    R:1 (largest class L rows, smallest S)`; none when it holds neither. `findings` may be
    a client's fit metrics as Flower delivers them (any Flower `Scalar`)."""
    if findings.get("single_class"):
        return ("single class",)
    largest, smallest = findings.get("largest_class"), findings.get("smallest_class")
    if isinstance(largest, int) and isinstance(smallest, int) and smallest > 0:
        return (f"class imbalance {largest / smallest:.0f}:1 (largest class {largest} rows, "
                f"smallest {smallest})",)
    return ()


@dataclass(frozen=True)
class QualityReport:
    """What the checks found in one client's data: rows kept, rows dropped per reason, and
    the numbers of a class warning (`FINDINGS`: a single class, or the largest and smallest
    class's rows of an imbalance), none when there is no warning."""

    rows: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    findings: dict[str, int] = field(default_factory=dict)

    @property
    def warnings(self) -> tuple[str, ...]:
        """The warnings, as logged on the client and recorded by the server."""
        return warning_text(self.findings)

    def as_metrics(self) -> dict[str, Scalar]:
        """The report as Flower fit metrics, numbers only: `data_rows`,
        `data_dropped_<reason>` and the findings (`data_single_class`, or
        `data_largest_class` and `data_smallest_class`) when there are any."""
        return {f"{DATA_QUALITY_PREFIX}rows": self.rows,
                **{f"{DATA_QUALITY_PREFIX}dropped_{reason}": self.dropped.get(reason, 0)
                   for reason in REASONS},
                **{f"{DATA_QUALITY_PREFIX}{key}": value for key, value in self.findings.items()}}


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
        return np.asarray(~np.isin(rows, (0, 1)).all(axis=1)), "multi-label targets must be 0 or 1"
    with np.errstate(invalid="ignore"):
        valid = finite & (np.mod(y, 1) == 0) & (y >= 0) & (y < spec.num_classes)
    return ~valid, (f"targets outside the model's classes 0..{spec.num_classes - 1} "
                    "(or not integers)")


def _class_findings(y: np.ndarray, spec: DataSpec, max_imbalance: float) -> dict[str, int]:
    """A single class, or an imbalance above `max_imbalance` (its largest and smallest
    class's rows), for single-label class targets: row counts only, no class label (the
    server sees them); empty when neither applies."""
    if spec.task not in ("multiclass", "binary"):
        return {}
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) == 1:
        return {"single_class": 1}
    if max_imbalance > 0 and counts.max() / counts.min() > max_imbalance:
        return {"largest_class": int(counts.max()), "smallest_class": int(counts.min())}
    return {}


class Cleaning(TypedDict):
    """`check_client_data`'s cleaning keywords (`cleaning`'s result)."""

    policy: str
    max_imbalance: float


def cleaning(settings: DataSettings) -> Cleaning:
    """The run's `data-cleaning` and `max-class-imbalance` as `check_client_data` keywords."""
    return {"policy": settings.data_cleaning, "max_imbalance": settings.max_class_imbalance}


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
    report = QualityReport(len(split), {reason: int(rows.sum()) for reason, rows in bad.items()},
                           _class_findings(split.y, spec, max_imbalance))
    for warning in report.warnings:
        log(WARNING, "%s: %s", where, warning)
    if any(report.dropped.values()):
        log(WARNING, "%s: dropped %s", where, report.dropped)
    return split.x, split.y, report
