"""The data layer's vocabulary: its error, what a model needs to know about the data
(`DataSpec`), features with targets (`Split`), and the run config's keys it reads
(`DataSettings`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fl_app.schema import LayerSettings


class DataError(ValueError):
    """A dataset or a node's data file cannot be loaded or does not fit the model."""


TASKS = ("multiclass", "binary", "multilabel", "regression")
FILE_SUFFIXES = (".npz", ".csv", ".parquet")


def is_data_file(value: object) -> bool:
    """Whether a `dataset` value names a data file (by its suffix)."""
    return str(value).lower().endswith(FILE_SUFFIXES)


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data: feature shape and the task's targets.

    `num_classes` is the number of classes (multiclass; 2 for binary), of labels
    (multilabel) or 0 (regression, with `num_targets` values per example).
    """

    input_shape: tuple[int, ...]
    num_classes: int
    task: str = "multiclass"
    num_targets: int = 1

    @property
    def output_units(self) -> int:
        """How many values a model's output holds per example for this task (its default head)."""
        return {"multiclass": self.num_classes, "binary": 1,
                "multilabel": self.num_classes}.get(self.task, self.num_targets)

    @property
    def is_classification(self) -> bool:
        """Whether targets are classes or labels (not continuous values)."""
        return self.task != "regression"

    def describe(self) -> str:
        """E.g. `a 10-class classification of inputs (64,)`."""
        what = {"multiclass": f"a {self.num_classes}-class classification",
                "binary": "a binary classification",
                "multilabel": f"a {self.num_classes}-label classification",
                "regression": f"a regression of {self.num_targets} value(s)"}[self.task]
        return f"{what} of inputs {self.input_shape}"


@dataclass(frozen=True)
class Split:
    """Features (float32) and targets: integer labels (int32; one 0/1 column per label for
    multi-label data) or float32 values for regression."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def as_split(x: np.ndarray, y: np.ndarray, task: str = "multiclass") -> Split:
    """Features as float32 and targets as the task keeps them (float32 for regression)."""
    y_dtype = np.float32 if task == "regression" else np.int32
    return Split(np.asarray(x, dtype=np.float32), np.asarray(y, dtype=y_dtype))


@dataclass(frozen=True)
class DataSettings(LayerSettings):
    """What the data layer reads from the run config (each field is the key of that name,
    declared in `fl_app.data.settings`): built once by the app layer
    (`DataSettings.from_config(cfg)`)."""

    dataset: str
    label_column: str
    task: str
    data_cleaning: str
    max_class_imbalance: float
    test_fraction: float
    validation_fraction: float
    seed: int
    partitioner: str
    dirichlet_alpha: float
    classes_per_partition: int
    shards_per_partition: int
    synthetic_alpha: float
    synthetic_beta: float
    synthetic_classes: int
    synthetic_dim: int
    synthetic_iid: bool
    synthetic_max_samples: int
    synthetic_num_users: int
    synthetic_images_noise: float
    synthetic_images_samples: int
