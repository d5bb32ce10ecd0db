"""Split a labelled pool across clients with flwr-datasets partitioners."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    PathologicalPartitioner,
    Partitioner,
    ShardPartitioner,
)

if TYPE_CHECKING:
    from fl_app.config import RunConfig

LABEL = "label"


def _iid(cfg: RunConfig, n: int) -> Partitioner:
    return IidPartitioner(num_partitions=n)


def _dirichlet(cfg: RunConfig, n: int) -> Partitioner:
    # Every client needs at least one training and one validation example.
    return DirichletPartitioner(
        num_partitions=n, partition_by=LABEL, alpha=cfg["dirichlet-alpha"],
        min_partition_size=2, self_balancing=False, shuffle=True, seed=cfg["seed"],
    )


def _pathological(cfg: RunConfig, n: int) -> Partitioner:
    return PathologicalPartitioner(
        num_partitions=n, partition_by=LABEL,
        num_classes_per_partition=cfg["classes-per-partition"],
        class_assignment_mode="first-deterministic", shuffle=True, seed=cfg["seed"],
    )


def _shard(cfg: RunConfig, n: int) -> Partitioner:
    return ShardPartitioner(
        num_partitions=n, partition_by=LABEL,
        num_shards_per_partition=cfg["shards-per-partition"], shuffle=True, seed=cfg["seed"],
    )


PARTITIONERS: dict[str, Callable[[RunConfig, int], Partitioner]] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "pathological": _pathological,
    "shard": _shard,
}
PARTITIONER_NAMES = tuple(PARTITIONERS)


def make_partitioner(cfg: RunConfig, num_partitions: int) -> Partitioner:
    """Return the flwr-datasets partitioner named by `partitioner` for `num_partitions` clients."""
    return PARTITIONERS[cfg["partitioner"]](cfg, num_partitions)


def partition_arrays(
    x: np.ndarray, y: np.ndarray, cfg: RunConfig, num_partitions: int
) -> Partitioner:
    """Attach an in-memory (x, y) pool to the configured partitioner and return it.

    The pool is shuffled with the run's seed first, since `IidPartitioner` splits in order.
    Partitions come back as `datasets.Dataset` with columns `x` and `label`.
    """
    order = np.random.default_rng(cfg["seed"]).permutation(len(y))
    pool = Dataset.from_dict({"x": x[order].reshape(len(y), -1), LABEL: y[order]})
    partitioner = make_partitioner(cfg, num_partitions)
    partitioner.dataset = pool
    return partitioner
