"""Datasets and partitioning: flwr-datasets partitioners, Synthetic(α,β), node files."""

from __future__ import annotations

import socket

import datasets
import huggingface_hub
import numpy as np
import pytest

from fl_app.data import sources as data
from fl_app.data.node_data import load_client
from fl_app.data.sources import (
    DataError,
    Split,
    data_source,
    data_spec,
    load_partition,
    split_train_val,
)
from fl_app.data.types import DataSettings
from tests.conftest import data_settings, make_config


def _labels(cfg, n):
    return [load_partition(DataSettings.from_config(cfg), i, n) for i in range(n)]


def test_iid_partitions_split_the_whole_pool_evenly():
    cfg = make_config()
    parts = _labels(cfg, 10)
    sizes = [len(p.train) + len(p.val) for p in parts]
    source = data_source(DataSettings.from_config(cfg))
    assert sum(sizes) + len(source.test_set()) == 1797
    assert max(sizes) - min(sizes) <= 1


def test_dirichlet_partitions_are_label_skewed():
    iid = [np.bincount(p.train.y, minlength=10) for p in _labels(make_config(), 10)]
    skewed = [np.bincount(p.train.y, minlength=10)
              for p in _labels(make_config(partitioner="dirichlet", dirichlet_alpha=0.1), 10)]
    top_share = lambda counts: np.mean([c.max() / c.sum() for c in counts])  # noqa: E731
    assert top_share(skewed) > top_share(iid) + 0.2


def test_pathological_partitions_hold_k_classes():
    cfg = make_config(partitioner="pathological", classes_per_partition=2)
    for part in _labels(cfg, 10):
        labels = np.concatenate([part.train.y, part.val.y])
        assert len(np.unique(labels)) <= 2


def test_shard_partitioner_runs():
    parts = _labels(make_config(partitioner="shard", shards_per_partition=2), 10)
    assert all(len(p.train) > 0 for p in parts)


def test_synthetic_is_one_user_per_client_with_server_test_set():
    cfg = make_config(dataset="synthetic", synthetic_num_users=5, synthetic_dim=20)
    source = data_source(DataSettings.from_config(cfg))
    assert source.spec.input_shape == (20,) and source.spec.num_classes == 10
    parts = _labels(cfg, 5)
    assert len({len(p.train) for p in parts}) > 1  # lognormal sizes differ
    assert len(source.test_set()) > 0
    with pytest.raises(DataError, match="synthetic-num-users=5"):
        load_partition(DataSettings.from_config(cfg), 0, 7)


def test_hub_dataset_offline_fails_with_a_clear_message(monkeypatch, tmp_path):
    # datasets and huggingface_hub read HF_HUB_OFFLINE at import: patch what they read,
    # with empty caches, and refuse any connection so the test can never download.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    attempts = []

    def refuse(*args: object) -> None:
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(DataError, match="dataset 'mnist'.*network access"):
        data_source(data_settings(dataset="mnist", seed=123))
    assert attempts == []  # offline mode stopped it before any lookup


@pytest.mark.parametrize("size, fraction, n_val", [
    (5, 0.1, 1),   # 0.5 rounds to 0: still one validation example
    (40, 0.1, 4),
    (2, 0.5, 1),
    (1, 0.5, 0),   # the only example is kept for training
    (40, 0.0, 0),
])
def test_validation_split_keeps_at_least_one_example(size, fraction, n_val):
    split = Split(np.zeros((size, 2), np.float32), np.zeros(size, np.int32))
    cfg = make_config(validation_fraction=fraction, fraction_evaluate=float(fraction > 0))
    train, val = split_train_val(split, DataSettings.from_config(cfg), salt=0)
    assert (len(train), len(val)) == (size - n_val, n_val)


@pytest.mark.parametrize("settings", [{}, dict(dataset="synthetic", synthetic_dim=7,
                                                synthetic_classes=4)])
def test_data_spec_is_known_without_loading_the_dataset(monkeypatch, settings):
    cfg = make_config(**settings)
    expected = data_source(DataSettings.from_config(cfg)).spec
    monkeypatch.setattr(data, "data_source", lambda cfg: pytest.fail("dataset was loaded"))
    assert data_spec(DataSettings.from_config(cfg)) == expected


def test_node_file_is_read_without_building_the_dataset(monkeypatch, tmp_path):
    part = load_partition(data_settings(), 0, 10)
    np.savez(tmp_path / "node.npz", x=part.train.x, y=part.train.y)
    monkeypatch.setattr(data, "data_source", lambda cfg: pytest.fail("dataset was loaded"))
    node = load_client(data_settings(), {"data-path": str(tmp_path / "node.npz")})
    assert len(node.train) + len(node.val) == len(part.train)


def test_node_without_partition_or_file_is_told_what_to_set():
    with pytest.raises(DataError, match="data-path"):
        load_client(data_settings(), {})


@pytest.fixture
def digits_arrays():
    part = load_partition(data_settings(), 0, 10)
    return part.train.x.reshape(len(part.train), -1), part.train.y


def test_node_file_npz_and_csv_load(tmp_path, digits_arrays):
    x, y = digits_arrays
    np.savez(tmp_path / "node.npz", x=x, y=y)
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["label"])
    np.savetxt(tmp_path / "node.csv", np.column_stack([x, y]), delimiter=",", header=header,
               comments="")
    cfg = make_config(validation_fraction=0.0, fraction_evaluate=0.0)
    for name in ("node.npz", "node.csv"):
        data = load_client(DataSettings.from_config(cfg), {"data-path": str(tmp_path / name)})
        np.testing.assert_allclose(data.train.x.reshape(len(y), -1), x, atol=1e-6)
        assert list(data.train.y) == list(y)


@pytest.mark.parametrize("problem, match", [
    ("missing", "does not exist"),
    ("corrupt", "unreadable"),
    ("wrong-dim", "feature dimension"),
    ("bad-label", "outside the model's classes"),
    ("nan", "NaN"),
    ("no-y", "lacks array"),
])
def test_bad_node_files_name_the_file(tmp_path, digits_arrays, problem, match):
    x, y = digits_arrays
    path = tmp_path / f"{problem}.npz"
    if problem == "corrupt":
        path.write_bytes(b"PK\x03\x04 this is not a zip archive")
    elif problem == "wrong-dim":
        np.savez(path, x=x[:, :50], y=y)
    elif problem == "bad-label":
        np.savez(path, x=x, y=np.where(y == 0, 12, y))
    elif problem == "nan":
        x = x.copy()
        x[3, 3] = np.nan
        np.savez(path, x=x, y=y)
    elif problem == "no-y":
        np.savez(path, x=x)
    with pytest.raises(DataError, match=match) as err:
        load_client(data_settings(), {"data-path": str(path)})
    assert str(path) in str(err.value)
