"""Datasets for the app and how each client gets its share.

* `digits` (default): scikit-learn's handwritten digits, shipped inside scikit-learn.
* `synthetic`: Synthetic(alpha, beta) of the FedProx paper (Li et al., 2020), generated
  here; its partition is natural (one user per client), so `partitioner` is ignored.
* `mnist`, `fashion-mnist`, `cifar10`, `hf:<id>`: Hugging Face hub datasets through
  flwr-datasets' `FederatedDataset` (needs network access).
* In deployment a SuperNode reads its own file from node-config `data-path` (see
  `fl_app.data.node_files`).

The server holds out a test set for centralized evaluation; each client splits its share
into train and validation parts.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np
from flwr_datasets.partitioner import Partitioner
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from fl_app.data import partitioning
from fl_app.data.partitioning import (
    PartitioningError,
    make_partitioner,
    partition_arrays,
)
from fl_app.schema import RunConfig

if TYPE_CHECKING:
    from datasets import Dataset
    from flwr_datasets import FederatedDataset

T = TypeVar("T")


class DataError(ValueError):
    """A dataset or a node's data file cannot be loaded or does not fit the model."""


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about the data: feature shape and number of classes."""

    input_shape: tuple[int, ...]
    num_classes: int


@dataclass(frozen=True)
class Split:
    """Features (float32) and integer labels."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class ClientData:
    """One client's local data: a training and a validation split, and where it came from."""

    train: Split
    val: Split
    source: str

    @property
    def key(self) -> int:
        """A stable integer naming this client's data (seeds its shuffling): a CRC of `source`."""
        return zlib.crc32(self.source.encode())


class DataSource(Protocol):
    """A dataset the app can train on."""

    spec: DataSpec

    def test_set(self) -> Split:
        """The server's held-out test set."""

    def partition(self, partition_id: int, num_partitions: int) -> Split:
        """The data of client `partition_id` out of `num_partitions`."""


def _as_split(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int32))


def _cut(partitioner: Partitioner, partition_id: int, num_partitions: int, cfg: RunConfig,
         spec: DataSpec) -> Dataset:
    """Partition `partition_id` of an assigned partitioner; failures raise DataError."""
    try:
        return partitioning.load_partition(partitioner, partition_id, num_partitions, cfg,
                                           spec.num_classes)
    except PartitioningError as err:
        raise DataError(str(err)) from err


def _partition_to_split(partition: Dataset, input_shape: tuple[int, ...]) -> Split:
    table = partition.with_format("numpy")
    x = np.asarray(table["x"], dtype=np.float32).reshape((-1, *input_shape))
    return _as_split(x, table["label"])


class PoolSource:
    """An in-memory labelled pool: a stratified held-out test set, the rest partitioned."""

    def __init__(self, x: np.ndarray, y: np.ndarray, num_classes: int, cfg: RunConfig) -> None:
        x_pool, x_test, y_pool, y_test = train_test_split(
            x, y, test_size=cfg["test-fraction"], stratify=y, random_state=cfg["seed"]
        )
        self.spec = DataSpec(tuple(x.shape[1:]), num_classes)
        self._test = _as_split(x_test, y_test)
        self._pool = (x_pool, y_pool)
        self._cfg = cfg
        self._partitioners: dict[int, Partitioner] = {}

    def test_set(self) -> Split:
        """The stratified held-out test set."""
        return self._test

    def partition(self, partition_id: int, num_partitions: int) -> Split:
        """Client `partition_id`'s share, cut by the configured flwr-datasets partitioner."""
        if num_partitions not in self._partitioners:
            self._partitioners[num_partitions] = partition_arrays(*self._pool, self._cfg,
                                                                  num_partitions)
        partition = _cut(self._partitioners[num_partitions], partition_id, num_partitions,
                         self._cfg, self.spec)
        return _partition_to_split(partition, self.spec.input_shape)


DIGITS_SPEC = DataSpec((64,), 10)


def _digits(cfg: RunConfig) -> PoolSource:
    digits = load_digits()
    return PoolSource(digits.data / 16.0, digits.target, DIGITS_SPEC.num_classes, cfg)


class SyntheticSource:
    """Synthetic(alpha, beta) (Li et al., 2020, FedProx), one user per client.

    User k draws u_k ~ N(0, alpha) and B_k ~ N(0, beta); its softmax model has
    W_k, b_k ~ N(u_k, 1) and its features x ~ N(v_k, Sigma) with v_k ~ N(B_k, 1) and
    Sigma = diag(j^-1.2). Labels are argmax(W_k x + b_k). Sample counts per user follow
    lognormal(4, 2) + 50 (capped at 1000 to keep simulations small). The test-fraction
    of every user is held out for the server's test set.
    """

    MAX_SAMPLES = 1000

    @staticmethod
    def spec_for(cfg: RunConfig) -> DataSpec:
        """The feature shape and classes that `cfg` asks for."""
        return DataSpec((cfg["synthetic-dim"],), cfg["synthetic-classes"])

    def __init__(self, cfg: RunConfig) -> None:
        self.num_users = cfg["synthetic-num-users"]
        dim, classes = cfg["synthetic-dim"], cfg["synthetic-classes"]
        self.spec = self.spec_for(cfg)
        rng = np.random.default_rng(cfg["seed"])
        sizes = np.minimum(rng.lognormal(4, 2, self.num_users).astype(int) + 50, self.MAX_SAMPLES)
        model_means = rng.normal(0, np.sqrt(cfg["synthetic-alpha"]), self.num_users)
        feature_means = rng.normal(0, np.sqrt(cfg["synthetic-beta"]), self.num_users)
        std = np.arange(1, dim + 1) ** -0.6  # sqrt of Sigma's diagonal j^-1.2
        self._users: list[Split] = []
        tests = []
        for k in range(self.num_users):
            w = rng.normal(model_means[k], 1, (dim, classes))
            b = rng.normal(model_means[k], 1, classes)
            v = rng.normal(feature_means[k], 1, dim)
            x = v + rng.normal(size=(sizes[k], dim)) * std
            y = np.argmax(x @ w + b, axis=1)
            n_test = max(1, int(round(cfg["test-fraction"] * len(y))))
            tests.append((x[:n_test], y[:n_test]))
            self._users.append(_as_split(x[n_test:], y[n_test:]))
        self._test = _as_split(np.concatenate([t[0] for t in tests]),
                               np.concatenate([t[1] for t in tests]))

    def test_set(self) -> Split:
        """The union of every user's held-out part."""
        return self._test

    def partition(self, partition_id: int, num_partitions: int) -> Split:
        """User `partition_id`'s data; the number of partitions must equal the number of users."""
        if num_partitions != self.num_users:
            raise DataError(
                f"dataset 'synthetic' has synthetic-num-users={self.num_users} users but the "
                f"federation has {num_partitions} partitions: set synthetic-num-users="
                f"{num_partitions} (or run {self.num_users} SuperNodes)"
            )
        return self._users[partition_id]


# Known hub datasets: name -> (hub id, what HubSource makes of it: images scaled to 0..1
# with a channel axis).
HUB_DATASETS = {
    "mnist": ("ylecun/mnist", DataSpec((28, 28, 1), 10)),
    "fashion-mnist": ("zalando-datasets/fashion_mnist", DataSpec((28, 28, 1), 10)),
    "cifar10": ("uoft-cs/cifar10", DataSpec((32, 32, 3), 10)),
}


class HubSource:
    """A Hugging Face hub image-classification dataset via flwr-datasets' FederatedDataset."""

    def __init__(self, name: str, cfg: RunConfig) -> None:
        self.hub_id = HUB_DATASETS[name][0] if name in HUB_DATASETS else name.removeprefix("hf:")
        self._name = name
        self._cfg = cfg
        test = self._load(lambda fds: fds.load_split("test"), num_partitions=1)
        self._image_key = next(k for k in test.features if k != "label")
        self._test = self._to_split(test)
        self.spec = DataSpec(self._test.x.shape[1:], test.features["label"].num_classes)

    def _load(self, get: Callable[[FederatedDataset], T], num_partitions: int) -> T:
        from flwr_datasets import FederatedDataset

        try:
            fds = FederatedDataset(
                dataset=self.hub_id, shuffle=True, seed=self._cfg["seed"],
                partitioners={"train": make_partitioner(self._cfg, num_partitions)},
            )
            return get(fds)
        except Exception as err:  # the hub raises many kinds of network errors
            raise DataError(
                f"dataset '{self._name}' ({self.hub_id}) could not be loaded from the Hugging "
                f"Face hub: {type(err).__name__}: {err}. Hub datasets need network access; "
                "offline, use dataset='digits' or dataset='synthetic'."
            ) from err

    def _to_split(self, table: Dataset) -> Split:
        images = np.stack([np.asarray(img, dtype=np.float32) for img in table[self._image_key]])
        if images.ndim == 3:
            images = images[..., None]
        return _as_split(images / 255.0, table["label"])

    def test_set(self) -> Split:
        """The hub dataset's own test split."""
        return self._test

    def partition(self, partition_id: int, num_partitions: int) -> Split:
        """Client `partition_id`'s share of the train split."""
        partitioner = self._load(lambda fds: fds.partitioners["train"], num_partitions)
        table = _cut(partitioner, partition_id, num_partitions, self._cfg, self.spec)
        return self._to_split(table)


DATASET_NAMES = ("digits", "synthetic", *HUB_DATASETS)


@lru_cache(maxsize=4)
def data_source(cfg: RunConfig) -> DataSource:
    """The dataset named by `dataset`, built once per process and run config."""
    name = cfg["dataset"]
    if name == "digits":
        return _digits(cfg)
    if name == "synthetic":
        return SyntheticSource(cfg)
    return HubSource(name, cfg)


def data_spec(cfg: RunConfig) -> DataSpec:
    """The input shape and classes of `dataset`, without loading it where they are known.

    Only `hf:<id>` datasets are loaded (through `data_source`) to learn them, so a
    SuperNode with its own `data-path` reads no other data.
    """
    name = cfg["dataset"]
    if name == "digits":
        return DIGITS_SPEC
    if name == "synthetic":
        return SyntheticSource.spec_for(cfg)
    if name in HUB_DATASETS:
        return HUB_DATASETS[name][1]
    return data_source(cfg).spec


def split_train_val(data: Split, cfg: RunConfig, salt: int) -> tuple[Split, Split]:
    """Split a client's data into train and validation parts (seeded by run seed and `salt`).

    The validation part holds `validation-fraction` of the examples, rounded, but at least
    one while `validation-fraction` > 0 and at least one example remains for training;
    a one-example client therefore has no validation part (its evaluation falls back to
    its training data).
    """
    fraction = cfg["validation-fraction"]
    n_val = min(max(1, round(fraction * len(data))), len(data) - 1) if fraction > 0 else 0
    if n_val == 0:
        return data, Split(data.x[:0], data.y[:0])
    order = np.random.default_rng([cfg["seed"], salt]).permutation(len(data))
    val, train = order[:n_val], order[n_val:]
    return Split(data.x[train], data.y[train]), Split(data.x[val], data.y[val])


@lru_cache(maxsize=64)
def load_partition(cfg: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    """Client data for simulation: partition `partition_id` of `num_partitions`."""
    if not 0 <= partition_id < num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    split = data_source(cfg).partition(partition_id, num_partitions)
    train, val = split_train_val(split, cfg, salt=partition_id)
    return ClientData(train, val, f"partition {partition_id}/{num_partitions} of {cfg['dataset']}")
