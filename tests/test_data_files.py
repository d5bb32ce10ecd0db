"""Your own data files: `.npz`/`.csv`/`.parquet` as a simulation dataset and as node data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

import run_simulation
from fl_app.data.files import read_data_file
from fl_app.data.node_data import load_client
from fl_app.data.sources import DataError, data_source, data_spec, load_partition
from fl_app.data.types import DataSettings
from fl_app.schema import ConfigError
from tests.conftest import data_settings, make_config


def _digits() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    return digits.data / 16.0, digits.target


def write(path, x: np.ndarray, y: np.ndarray, label: str = "label") -> str:
    """Write (x, y) in the format `path`'s suffix names; several target columns for 2-D y."""
    if path.suffix == ".npz":
        np.savez(path, x=x, y=y)
        return str(path)
    targets = y.reshape(len(y), -1)
    names = [label] if targets.shape[1] == 1 else [f"{label}{j}" for j in range(targets.shape[1])]
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    for j, name in enumerate(names):
        frame[name] = targets[:, j]
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return str(path)


@pytest.mark.parametrize("suffix", [".npz", ".csv", ".parquet"])
def test_a_file_is_a_dataset_with_a_held_out_test_set_and_partitions(tmp_path, suffix):
    x, y = _digits()
    cfg = make_config(dataset=write(tmp_path / f"digits{suffix}", x, y))
    source = data_source(DataSettings.from_config(cfg))
    assert data_spec(DataSettings.from_config(cfg)) == source.spec and source.spec.num_classes == 10
    assert source.spec.input_shape == (64,) and source.spec.task == "multiclass"
    parts = [load_partition(DataSettings.from_config(cfg), i, 5) for i in range(5)]
    held_out = len(source.test_set())
    assert held_out == np.ceil(0.2 * len(y))  # scikit-learn rounds the test part up
    assert sum(len(p.train) + len(p.val) for p in parts) + held_out == len(y)
    assert parts[0].source == f"partition 0/5 of {cfg['dataset']}"
    assert parts[0].quality.rows == len(parts[0].train) + len(parts[0].val)


def test_the_label_column_key_names_the_target(tmp_path):
    x, y = _digits()
    cfg = make_config(dataset=write(tmp_path / "d.csv", x, y, label="digit"), label_column="digit")
    train = load_partition(DataSettings.from_config(cfg), 0, 2).train
    assert set(np.unique(train.y)) == set(range(10))


@pytest.mark.parametrize("task, y, spec", [
    ("multiclass", lambda n: np.arange(n) % 4, (4, "multiclass", 1)),
    ("binary", lambda n: np.arange(n) % 2, (2, "binary", 1)),
    ("multilabel", lambda n: np.stack([np.arange(n) % 2, np.arange(n) // 2 % 2,
                                       np.arange(n) % 3 == 0], axis=1).astype(int),
     (3, "multilabel", 1)),
    ("regression", lambda n: np.linspace(0.5, 7.25, n), (0, "regression", 1)),
    ("regression", lambda n: np.stack([np.linspace(0, 1, n), np.linspace(3, 2, n)], 1),
     (0, "regression", 2)),
])
def test_task_auto_infers_each_task(tmp_path, task, y, spec):
    x, targets = np.random.default_rng(0).normal(size=(200, 6)), y(200)
    columns = ",".join(f"label{j}" for j in range(targets.shape[1])) if targets.ndim > 1 \
        else "label"
    cfg = make_config(dataset=write(tmp_path / "t.csv", x, targets), label_column=columns)
    got = data_spec(DataSettings.from_config(cfg))
    assert (got.num_classes, got.task, got.num_targets) == spec and got.input_shape == (6,)
    assert len(load_partition(DataSettings.from_config(cfg), 1, 3).train) > 0


def test_integer_regression_targets_need_task_regression(tmp_path):
    x = np.random.default_rng(0).normal(size=(100, 3))
    path = write(tmp_path / "counts.npz", x, np.arange(100) % 7)
    assert data_spec(data_settings(dataset=path)).task == "multiclass"
    spec = data_spec(data_settings(dataset=path, task="regression"))
    assert (spec.task, spec.num_targets) == ("regression", 1)


def test_a_continuous_target_is_binned_for_label_based_partitioners(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 4))
    y = x @ np.array([1.0, -2.0, 0.5, 0.0]) + rng.normal(0.1, size=600)
    cfg = make_config(dataset=write(tmp_path / "r.parquet", x, y), partitioner="dirichlet",
                      dirichlet_alpha=0.1)
    assert data_spec(DataSettings.from_config(cfg)).task == "regression"
    means = [load_partition(DataSettings.from_config(cfg), i, 4).train.y.mean() for i in range(4)]
    assert np.ptp(means) > 0.5  # skewed target ranges, not an iid split
    assert load_partition(DataSettings.from_config(cfg), 0, 4).train.y.dtype == np.float32


def test_the_same_file_is_node_data_in_deployment(tmp_path):
    x, y = _digits()
    path = write(tmp_path / "node.parquet", x[:300], y[:300])
    cfg = make_config(validation_fraction=0.0, fraction_evaluate=0.0)
    data = load_client(DataSettings.from_config(cfg), {"data-path": path})
    np.testing.assert_allclose(data.train.x, x[:300], atol=1e-6)
    assert list(data.train.y) == list(y[:300]) and data.source == f"file {path}"


def test_node_files_are_checked_against_the_servers_dataset(tmp_path):
    x, y = _digits()
    server = write(tmp_path / "server.csv", x[:, :10], y % 3)  # 10 features, 3 classes
    node = write(tmp_path / "node.csv", x[:50, :10], y[:50])  # labels up to 9
    with pytest.raises(DataError, match=r"node.csv.*outside the model's classes 0\.\.2"):
        load_client(data_settings(dataset=server), {"data-path": node})


def test_task_for_a_named_dataset_must_be_its_own():
    assert make_config(dataset="diabetes", task="regression")["task"] == "regression"
    with pytest.raises(ConfigError, match="'task' is 'binary'.*'digits' is multiclass"):
        make_config(task="binary")


def test_dataset_accepts_only_data_file_suffixes(tmp_path):
    with pytest.raises(ConfigError, match=r"\.npz, \.csv or \.parquet"):
        make_config(dataset=str(tmp_path / "data.txt"))


@pytest.mark.parametrize("problem, match", [
    ("missing", "does not exist"),
    ("corrupt", "unreadable"),
    ("no-label", r"no label column 'label'.*did you mean 'labels'"),
    ("text", r"column 'f2' is not numeric, first at row 3 \(1 such row"),
    ("no-features", "no feature columns"),
    ("empty", "unreadable|holds no examples"),
])
def test_bad_files_name_the_file_and_the_fault(tmp_path, problem, match):
    path = tmp_path / f"{problem}.csv"
    rows = "f0,f1,f2,label\n" + "".join(f"{i},1,{i}.5,{i % 2}\n" for i in range(6))
    text = {"no-label": rows.replace("label", "labels"),
            "text": rows.replace("3.5", "seven"), "no-features": "label\n0\n1\n",
            "empty": ""}
    if problem == "corrupt":
        path.write_bytes(b"\xff\xfe\x00\x81 not text")
    elif problem != "missing":
        path.write_text(text.get(problem, rows))
    with pytest.raises(DataError, match=match) as err:
        data_source(data_settings(dataset=str(path)))
    assert str(path) in str(err.value)


def test_a_corrupt_parquet_file_is_unreadable(tmp_path):
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=f"{path} is unreadable"):
        read_data_file(str(path))


def test_a_multiclass_file_needs_two_classes(tmp_path):
    path = write(tmp_path / "one.npz", np.ones((10, 2)), np.zeros(10))
    with pytest.raises(DataError, match="one.npz.*at least two classes"):
        data_spec(data_settings(dataset=path, task="multiclass"))


def test_a_multiclass_task_needs_one_target_column(tmp_path):
    path = write(tmp_path / "two.npz", np.ones((10, 2)), np.zeros((10, 2)))
    with pytest.raises(DataError, match="two.npz.*needs one target column"):
        data_spec(data_settings(dataset=path, task="multiclass"))


@pytest.mark.slow
def test_a_csv_dataset_with_dirichlet_partitions_trains_end_to_end(tmp_path):
    x, y = _digits()
    path = write(tmp_path / "digits.csv", x, y)
    code = run_simulation.main(["--run-config", f"dataset='{path}' partitioner='dirichlet' "
                                "num-server-rounds=20", "--out", str(tmp_path / "out")])
    assert code == 0
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert history["rounds"][-1]["centralized"]["accuracy"] >= 0.85
    first = history["rounds"][1]["fit"]
    assert len(first["data_quality"]) == 10  # every client's report, recorded once
    assert all(report["dropped_nonfinite"] == 0 for report in first["data_quality"].values())
    assert not any(k.startswith("data_") for k in first if k != "data_quality")  # no averages
    assert all("data_quality" not in r["fit"] for r in history["rounds"][2:])


def test_a_label_far_beyond_any_class_count_is_refused_not_built(tmp_path):
    x, y = _digits()
    y = y.astype(np.float64)
    y[7] = 1e12  # a typo: a model with 10**12 outputs would exhaust memory
    path = write(tmp_path / "typo.npz", x, y)
    with pytest.raises(DataError, match="more than 10000 classes .*not shown.*task='regression'"):
        data_spec(data_settings(dataset=path))


def test_a_dataset_file_rewritten_on_disk_is_read_again(tmp_path):
    x, y = _digits()
    path = write(tmp_path / "d.npz", x, y)
    cfg = make_config(dataset=path)
    settings = DataSettings.from_config(cfg)
    assert data_spec(settings).input_shape == (64,)
    assert len(load_partition(settings, 0, 10).train) > 0
    write(tmp_path / "d.npz", x[:, :32], y % 5)
    assert data_spec(settings).input_shape == (32,) and data_spec(settings).num_classes == 5
    assert load_partition(settings, 0, 10).train.x.shape[1:] == (32,)


def test_a_file_without_a_header_row_is_named_but_its_values_are_not_quoted(tmp_path):
    path = tmp_path / "headerless.csv"
    path.write_text("5.1,3.5,123456789\n4.9,3.0,987654321\n")
    with pytest.raises(DataError, match="looks like data.*needs a header row") as info:
        data_spec(data_settings(dataset=str(path)))
    assert "123456789" not in str(info.value) and "5.1" not in str(info.value)


def test_a_node_file_is_read_once_per_run_config_and_again_when_it_changes(tmp_path):
    """A deployment node's warm ClientApp process serves every message of a run: its data
    file is loaded and checked once (`fl_app.data.node_data`), and again after a change."""
    import os

    from fl_app.data import node_data

    x, y = _digits()
    path = tmp_path / "node.npz"
    write(path, x[:200], y[:200])
    cfg = make_config()
    node = {"data-path": str(path)}
    node_data._node_files.clear()
    first = node_data.load_client(DataSettings.from_config(cfg), node)
    assert node_data.load_client(DataSettings.from_config(cfg), node) is first
    os.utime(path, ns=(1, 1))  # the file changed on disk (its stamp)
    assert node_data.load_client(DataSettings.from_config(cfg), node) is not first
    for seed in range(node_data.NODE_FILE_RUNS + 1):
        node_data.load_client(data_settings(seed=seed), node)
    assert len(node_data._node_files) == node_data.NODE_FILE_RUNS
