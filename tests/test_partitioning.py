"""Partitioning failures name the partitioner, its keys and the number of partitions."""

from __future__ import annotations

import pytest
from datasets import Dataset
from flwr_datasets.partitioner import IidPartitioner

from fl_app.data.partitioning import PartitioningError
from fl_app.data.partitioning import load_partition as cut_partition
from fl_app.data.sources import DataError, load_partition
from fl_app.data.types import DataSettings
from tests.conftest import data_settings, make_config


@pytest.mark.parametrize("settings, num_partitions, expected", [
    (dict(partitioner="shard", shards_per_partition=50), 100,
     ["partitioner='shard' (shards-per-partition=50) with 100 partitions",
      "lower shards-per-partition"]),
    (dict(partitioner="dirichlet", dirichlet_alpha=0.01), 100,
     ["partitioner='dirichlet' (dirichlet-alpha=0.01) with 100 partitions",
      "raise dirichlet-alpha"]),
    (dict(partitioner="iid"), 2000,
     ["partitioner='iid' with 2000 partitions", "cannot split 1437 examples",
      "use fewer partitions"]),
])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_partitioner_that_cannot_split_the_pool_names_its_keys(settings, num_partitions,
                                                                  expected):
    with pytest.raises(DataError) as err:
        load_partition(data_settings(**settings), num_partitions - 1, num_partitions)
    for text in expected:
        assert text in str(err.value)


def test_more_classes_per_partition_than_the_dataset_has_is_refused():
    cfg = make_config(partitioner="pathological", classes_per_partition=11)
    with pytest.raises(DataError, match=r"partitioner='pathological' \(classes-per-partition=11\)"
                                        r" with 10 partitions: the dataset has only 10 classes"):
        load_partition(DataSettings.from_config(cfg), 0, 10)


class _Hollow(IidPartitioner):
    """A partitioner whose partitions are all empty."""

    def load_partition(self, partition_id: int) -> Dataset:
        return self.dataset.select([])


def test_an_empty_partition_is_refused():
    partitioner = _Hollow(num_partitions=4)
    partitioner.dataset = Dataset.from_dict({"x": [0.0, 1.0], "label": [0, 1]})
    with pytest.raises(PartitioningError, match="with 4 partitions: partition 3 is empty"):
        cut_partition(partitioner, 3, 4, data_settings(), num_classes=2)
