"""Split a labelled pool across clients with flwr-datasets partitioners."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
    ShardPartitioner,
)

from fl_app.data.types import DataSettings

LABEL = "label"  # the column label-based partitioners split by
TARGET = "y"  # the pool's targets (equal to LABEL for single-label classes)
TARGET_BINS = 10  # quantile bins that stand in for classes when partitioning regression data


class PartitioningError(ValueError):
    """The configured partitioner cannot split the pool into the requested partitions."""


def _iid(settings: DataSettings, n: int) -> Partitioner:
    return IidPartitioner(num_partitions=n)


def _dirichlet(settings: DataSettings, n: int) -> Partitioner:
    # Every client needs at least one training and one validation example.
    return DirichletPartitioner(
        num_partitions=n, partition_by=LABEL, alpha=settings.dirichlet_alpha,
        min_partition_size=2, self_balancing=False, shuffle=True, seed=settings.seed,
    )


def _pathological(settings: DataSettings, n: int) -> Partitioner:
    return PathologicalPartitioner(
        num_partitions=n, partition_by=LABEL,
        num_classes_per_partition=settings.classes_per_partition,
        class_assignment_mode="first-deterministic", shuffle=True, seed=settings.seed,
    )


def _shard(settings: DataSettings, n: int) -> Partitioner:
    return ShardPartitioner(
        num_partitions=n, partition_by=LABEL,
        num_shards_per_partition=settings.shards_per_partition, shuffle=True, seed=settings.seed,
    )


@dataclass(frozen=True)
class PartitionerKind:
    """A partitioner by config name: its factory, its own config keys, and what to try if it
    fails."""

    factory: Callable[[DataSettings, int], Partitioner]
    keys: tuple[str, ...]
    hint: str


PARTITIONERS: dict[str, PartitionerKind] = {
    "iid": PartitionerKind(_iid, (), "use fewer partitions"),
    "dirichlet": PartitionerKind(
        _dirichlet, ("dirichlet-alpha",),
        "raise dirichlet-alpha (less label skew) or use fewer partitions"),
    "pathological": PartitionerKind(
        _pathological, ("classes-per-partition",),
        "lower classes-per-partition or use fewer partitions"),
    "shard": PartitionerKind(
        _shard, ("shards-per-partition",), "lower shards-per-partition or use fewer partitions"),
}
PARTITIONER_NAMES = tuple(PARTITIONERS)


def make_partitioner(settings: DataSettings, num_partitions: int) -> Partitioner:
    """Return the flwr-datasets partitioner named by `partitioner` for `num_partitions` clients."""
    return PARTITIONERS[settings.partitioner].factory(settings, num_partitions)


def _describe(settings: DataSettings, num_partitions: int) -> str:
    """E.g. `partitioner='shard' (shards-per-partition=2) with 100 partitions`."""
    keys = PARTITIONERS[settings.partitioner].keys
    values = ", ".join(f"{key}={getattr(settings, key.replace('-', '_'))}" for key in keys)
    own = f" ({values})" if keys else ""
    return f"partitioner={settings.partitioner!r}{own} with {num_partitions} partitions"


def load_partition(partitioner: Partitioner, partition_id: int, num_partitions: int,
                   settings: DataSettings, num_classes: int) -> Dataset:
    """Partition `partition_id` of `num_partitions` from a partitioner that holds its dataset.

    Raises PartitioningError naming `partitioner`, its keys and the number of partitions,
    with a hint, when the partitioner cannot split the pool (too many shards, a
    Dirichlet draw that leaves clients too small, more classes per client than exist)
    or leaves this partition empty.
    """
    setting = _describe(settings, num_partitions)
    hint = PARTITIONERS[settings.partitioner].hint
    if settings.partitioner == "pathological" and settings.classes_per_partition > num_classes:
        raise PartitioningError(f"{setting}: the dataset has only {num_classes} classes: "
                                f"set classes-per-partition <= {num_classes}")
    try:
        partition = partitioner.load_partition(partition_id)
    except Exception as err:  # flwr-datasets raises ValueError, ZeroDivisionError, ...
        raise PartitioningError(
            f"{setting} cannot split {len(partitioner.dataset)} examples "
            f"({type(err).__name__}: {err}): {hint}"
        ) from err
    if len(partition) == 0:
        raise PartitioningError(f"{setting}: partition {partition_id} is empty: {hint}")
    return partition


def partition_key(y: np.ndarray, task: str, partitioner: str) -> np.ndarray:
    """What label-based partitioners split by: the class, or for a regression target its
    quantile bin (`TARGET_BINS` bins, so "non-IID" means skewed target ranges).

    Multi-label targets have no single class: only `iid` splits them.
    """
    if task == "regression":
        values = y.reshape(len(y), -1)[:, 0]
        edges = np.quantile(values, np.linspace(0, 1, TARGET_BINS + 1)[1:-1])
        return np.searchsorted(edges, values, side="right").astype(np.int64)
    if task == "multilabel":
        if partitioner != "iid":
            raise PartitioningError(
                f"partitioner={partitioner!r} splits by class, but multi-label data has no "
                "single class per example: use partitioner='iid'")
        return np.zeros(len(y), dtype=np.int64)
    return np.asarray(y, dtype=np.int64)


def partition_arrays(x: np.ndarray, y: np.ndarray, settings: DataSettings, num_partitions: int,
                     task: str = "multiclass") -> Partitioner:
    """Attach an in-memory (x, y) pool to the configured partitioner and return it.

    The pool is shuffled with the run's seed first, since `IidPartitioner` splits in order.
    Partitions come back as `datasets.Dataset` with columns `x`, `TARGET` and `LABEL`.
    """
    order = np.random.default_rng(settings.seed).permutation(len(y))
    x, y = x[order], y[order]
    pool = Dataset.from_dict({"x": x.reshape(len(y), -1), TARGET: y,
                              LABEL: partition_key(y, task, settings.partitioner)})
    partitioner = make_partitioner(settings, num_partitions)
    partitioner.dataset = pool
    return partitioner
