"""The embedded datasets of every task: binary, multi-label, regression beside digits."""

from __future__ import annotations

import numpy as np
import pytest

from fl_app.data.partitioning import TARGET_BINS, partition_key
from fl_app.data.sources import data_source, data_spec, load_partition
from fl_app.data.types import DataSettings
from tests.conftest import data_settings, make_config


@pytest.mark.parametrize("dataset, task, y_dtype, units", [
    ("digits", "multiclass", np.int32, 10),
    ("breast-cancer", "binary", np.int32, 1),
    ("multilabel", "multilabel", np.int32, 5),
    ("diabetes", "regression", np.float32, 1),
])
def test_each_embedded_dataset_declares_its_task_and_keeps_targets_in_its_dtype(
        dataset, task, y_dtype, units):
    cfg = make_config(dataset=dataset)
    source = data_source(DataSettings.from_config(cfg))
    assert source.spec == data_spec(DataSettings.from_config(cfg)) and source.spec.task == task
    assert source.spec.output_units == units
    client = load_partition(DataSettings.from_config(cfg), 3, 10)
    assert client.train.y.dtype == y_dtype == source.test_set().y.dtype
    assert client.train.x.shape[1:] == source.spec.input_shape


def test_standardized_columns_use_the_training_pool_statistics_only():
    source = data_source(data_settings(dataset="diabetes"))
    pool = np.concatenate([load_partition(data_settings(dataset="diabetes"), i, 10).train.y
                           for i in range(10)] +
                          [load_partition(data_settings(dataset="diabetes"), i, 10).val.y
                           for i in range(10)])
    assert abs(pool.mean()) < 1e-5 and pool.std() == pytest.approx(1.0, rel=1e-4)
    assert abs(source.test_set().y.mean()) > 1e-3  # the test set is scaled, not refitted
    features = data_source(data_settings(dataset="breast-cancer")).test_set().x
    assert np.abs(features).max() < 15  # raw breast-cancer features reach 4254


def test_label_based_partitioners_split_a_regression_target_by_quantile_bins():
    values = np.random.default_rng(0).normal(size=1000)
    bins = partition_key(values, "regression", "dirichlet")
    assert set(bins) == set(range(TARGET_BINS))
    order = np.argsort(values)
    assert np.all(np.diff(bins[order]) >= 0)  # bins follow the target's order
    cfg = make_config(dataset="diabetes", partitioner="dirichlet", dirichlet_alpha=0.1)
    means = [load_partition(DataSettings.from_config(cfg), i, 5).train.y.mean() for i in range(5)]
    assert max(means) - min(means) > 0.5  # skewed target ranges, not IID


def test_multilabel_data_refuses_a_label_based_partitioner():
    cfg = make_config(dataset="multilabel", partitioner="dirichlet")
    with pytest.raises(ValueError, match="multi-label data has no single class"):
        load_partition(DataSettings.from_config(cfg), 0, 10)
