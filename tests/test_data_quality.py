"""Data-quality checks: every problem under both `data-cleaning` policies, the warnings,
and the report's way through the client's fit metrics into history.json."""

from __future__ import annotations

import numpy as np
import pytest

from fl_app.client.keras_client import ClientSettings, KerasClient
from fl_app.data.node_data import load_client
from fl_app.data.quality import QualityReport, check_client_data
from fl_app.data.sources import (
    ClientData,
    DataError,
    DataSpec,
    Split,
    _load_partition,
    load_partition,
)
from fl_app.data.types import DataSettings
from fl_app.ml.trainer import TrainSettings, trainer_for
from fl_app.server.runner import data_quality
from tests.conftest import data_settings, make_config
from tests.flower_objects import IdleProxy, fit_res

CLASSES = DataSpec((3,), 4)
WHERE = "file /data/a.csv"


def _clean(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    return np.arange(n * 3, dtype=float).reshape(n, 3) / n, np.arange(n) % 4


def _broken(problem: str) -> tuple[np.ndarray, np.ndarray, DataSpec]:
    """Clean data with rows 5 and 9 broken by `problem`."""
    x, y = _clean()
    spec = CLASSES
    if problem == "nan-feature":
        x[[5, 9], 1] = np.nan
    elif problem == "inf-feature":
        x[[5, 9], 0] = -np.inf
    elif problem == "nan-target":
        y = y.astype(float)
        y[[5, 9]] = np.nan
    elif problem == "out-of-range":
        y[[5, 9]] = [4, -1]
    elif problem == "non-integer":
        y = y.astype(float)
        y[[5, 9]] = 1.5
    elif problem == "multilabel-not-0-1":
        spec = DataSpec((3,), 2, task="multilabel")
        y = np.stack([y % 2, y // 2], axis=1)
        y[[5, 9], 1] = 2
    elif problem == "inf-regression":
        spec = DataSpec((3,), 0, task="regression")
        y = y.astype(float)
        y[[5, 9]] = np.inf
    return x, y, spec


ROW_PROBLEMS = {  # problem -> (what the error says, the reason it is dropped for)
    "nan-feature": ("NaN or infinite", "nonfinite"),
    "inf-feature": ("NaN or infinite", "nonfinite"),
    "nan-target": ("outside the model's classes", "target"),
    "out-of-range": ("outside the model's classes 0..3", "target"),
    "non-integer": ("not integers", "target"),
    "multilabel-not-0-1": ("must be 0 or 1", "target"),
    "inf-regression": ("targets are NaN or infinite", "target"),
}


@pytest.mark.parametrize("problem", ROW_PROBLEMS)
def test_a_bad_row_is_an_error_naming_where_and_the_first_bad_row(problem):
    x, y, spec = _broken(problem)
    with pytest.raises(DataError, match=ROW_PROBLEMS[problem][0]) as err:
        check_client_data(x, y, spec, WHERE, "error")
    assert str(err.value).startswith(WHERE)
    assert "in 2 row(s), first at row 5" in str(err.value)


@pytest.mark.parametrize("problem", ROW_PROBLEMS)
def test_drop_rows_drops_and_counts_the_bad_rows(problem):
    x, y, spec = _broken(problem)
    x_kept, y_kept, report = check_client_data(x, y, spec, WHERE, "drop-rows")
    reason = ROW_PROBLEMS[problem][1]
    assert report.rows == len(x_kept) == len(y_kept) == 38
    assert report.dropped == {"nonfinite": 0, "target": 0, reason: 2}
    assert np.isfinite(x_kept).all() and np.isfinite(y_kept).all()
    assert x_kept.dtype == np.float32
    assert y_kept.dtype == (np.float32 if spec.task == "regression" else np.int32)


def test_a_row_bad_in_features_and_target_is_counted_once():
    x, y = _clean()
    x[5, 0], y[5] = np.nan, 7
    _, _, report = check_client_data(x, y, CLASSES, WHERE, "drop-rows")
    assert report.dropped == {"nonfinite": 1, "target": 0} and report.rows == 39


@pytest.mark.parametrize("policy", ["error", "drop-rows"])
def test_features_that_do_not_fit_the_model_are_always_an_error(policy):
    x, y = _clean()
    with pytest.raises(DataError, match=r"file /data/a.csv: feature dimension \(2,\)"):
        check_client_data(x[:, :2], y, CLASSES, WHERE, policy)
    with pytest.raises(DataError, match="39 feature rows but 40 targets"):
        check_client_data(x[:39], y, CLASSES, WHERE, policy)


@pytest.mark.parametrize("policy", ["error", "drop-rows"])
def test_targets_or_dtypes_that_do_not_fit_the_model_are_always_an_error(policy):
    x, y = _clean()
    with pytest.raises(DataError, match=r"targets of shape \(40, 2\) do not fit"):
        check_client_data(x, np.stack([y, y], axis=1), CLASSES, WHERE, policy)
    with pytest.raises(DataError, match="features are not numeric"):
        check_client_data(x.astype(str), y, CLASSES, WHERE, policy)
    with pytest.raises(DataError, match="targets are not numeric"):
        check_client_data(x, y.astype(str), CLASSES, WHERE, policy)


@pytest.mark.parametrize("policy", ["error", "drop-rows"])
def test_empty_data_is_always_an_error(policy):
    x, y = _clean()
    with pytest.raises(DataError, match=f"{WHERE} holds no examples"):
        check_client_data(x[:0], y[:0], CLASSES, WHERE, policy)


def test_data_left_empty_by_dropping_is_an_error():
    x, y = _clean(4)
    x[:, 0] = np.nan
    with pytest.raises(DataError, match="no examples left after dropping 4 bad row"):
        check_client_data(x, y, CLASSES, WHERE, "drop-rows")


def test_single_class_data_is_a_warning_not_an_error():
    x, y = _clean()
    _, _, report = check_client_data(x, np.full(40, 2), CLASSES, WHERE)
    assert report.warnings == ("single class",)  # the label (2) never leaves the client
    assert report.as_metrics()["data_single_class"] == 1


@pytest.mark.parametrize("limit, warned", [(50.0, True), (100.0, False), (0.0, False)])
def test_extreme_imbalance_is_a_warning_above_max_class_imbalance(limit, warned):
    x = np.zeros((61, 3))
    y = np.array([0] * 60 + [1])  # 60:1
    _, _, report = check_client_data(x, y, CLASSES, WHERE, max_imbalance=limit)
    assert report.warnings == (("class imbalance 60:1 (largest class 60 rows, smallest 1)",)
                               if warned else ())


def test_the_report_sent_is_numbers_only():
    report = QualityReport(rows=5, findings={"largest_class": 99, "smallest_class": 1})
    sent = report.as_metrics()
    assert all(isinstance(value, int) for value in sent.values()), sent
    assert report.warnings == ("class imbalance 99:1 (largest class 99 rows, smallest 1)",)
    assert QualityReport(findings={"single_class": 1}).warnings == ("single class",)


def test_clean_data_gets_a_clean_report():
    x, y = _clean()
    _, _, report = check_client_data(x, y, CLASSES, WHERE)
    assert report.as_metrics() == {"data_rows": 40, "data_dropped_nonfinite": 0,
                                   "data_dropped_target": 0}


def test_pathological_one_class_partitions_keep_working_and_warn():
    cfg = make_config(partitioner="pathological", classes_per_partition=1)
    part = load_partition(DataSettings.from_config(cfg), 0, 10)
    assert len(np.unique(part.train.y)) == 1
    assert part.quality.warnings and part.quality.warnings[0].startswith("single class")


def test_simulation_partitions_are_checked(monkeypatch):
    cfg = make_config(data_cleaning="drop-rows")
    checked = []
    real = check_client_data
    monkeypatch.setattr("fl_app.data.sources.check_client_data",
                        lambda *args, **kw: checked.append((args[3], kw)) or real(*args, **kw))
    _load_partition.cache_clear()
    part = load_partition(DataSettings.from_config(cfg), 2, 10)
    assert checked == [("partition 2/10 of digits",
                        {"policy": "drop-rows", "max_imbalance": 50.0})]
    assert part.quality.rows == len(part.train) + len(part.val)


@pytest.mark.parametrize("policy", ["error", "drop-rows"])
def test_a_node_file_with_bad_rows_is_named_or_cleaned(tmp_path, policy):
    part = load_partition(data_settings(), 0, 10)
    x, y = part.train.x.copy(), part.train.y.copy()
    x[7, 3] = np.inf
    np.savez(tmp_path / "node.npz", x=x, y=y)
    cfg = make_config(data_cleaning=policy)
    if policy == "error":
        with pytest.raises(DataError, match=r"node.npz: features are NaN .* first at row 7"):
            load_client(DataSettings.from_config(cfg), {"data-path": str(tmp_path / "node.npz")})
        return
    data = load_client(DataSettings.from_config(cfg), {"data-path": str(tmp_path / "node.npz")})
    assert data.quality.dropped["nonfinite"] == 1
    assert len(data.train) + len(data.val) == len(y) - 1


def test_a_dataset_file_with_bad_rows_is_named_by_file_row(tmp_path):
    x, y = _clean(200)
    y[17] = -1
    path = tmp_path / "pool.npz"
    np.savez(path, x=x, y=y)
    cfg = make_config(dataset=str(path), task="multiclass")
    with pytest.raises(DataError, match=r"dataset file .*pool.npz: .* first at row 17"):
        load_partition(DataSettings.from_config(cfg), 0, 2)


def test_a_clients_fit_metrics_carry_its_data_report():
    cfg = make_config(local_epochs=1)
    part = load_partition(DataSettings.from_config(cfg), 0, 10)
    report = QualityReport(rows=99, dropped={"nonfinite": 3, "target": 1},
                           findings={"single_class": 1})
    data = ClientData(part.train, part.val, part.source, report)
    train = TrainSettings.from_config(cfg)
    client = KerasClient(trainer_for(train, DataSpec((64,), 10)), data,
                         ClientSettings.from_config(cfg))
    _, _, metrics = client.fit(client.get_parameters({}), {})
    assert {k: metrics[k] for k in report.as_metrics()} == {
        "data_rows": 99, "data_dropped_nonfinite": 3, "data_dropped_target": 1,
        "data_single_class": 1}


def test_client_data_has_a_clean_report_by_default():
    empty = Split(np.zeros((0, 3)), np.zeros(0))
    assert ClientData(empty, empty, "x").quality == QualityReport()


def test_the_runner_records_each_clients_report_the_first_time_it_reports():
    arrays = [np.zeros(2, dtype=np.float32)]
    report = {"data_rows": 10, "data_dropped_nonfinite": 2}
    results = [(IdleProxy("a"), fit_res(arrays, 10, {**report, "train_loss": 0.5})),
               (IdleProxy("b"), fit_res(arrays, 10, {"train_loss": 0.5}))]
    seen: set[str] = set()
    assert data_quality(results, seen) == {
        "a": {"rows": 10, "dropped_nonfinite": 2}}
    assert data_quality(results, seen) == {}  # once per client


def test_a_report_with_nothing_of_the_expected_form_is_not_recorded():
    arrays = [np.zeros(2, dtype=np.float32)]
    results = [(IdleProxy("liar"), fit_res(arrays, 10, {"data_label_7_rows": 40}))]
    assert data_quality(results, set()) == {}


@pytest.mark.parametrize("lie", [
    {"data_warnings": "class 7 only"},  # text: the server makes the warnings' text itself
    {"data_single_class": b"7"},  # a finding that is not a count
    {"data_largest_class": 7.5},
    {"data_rows": "40 rows of class 7"},  # a count that is not one
    {"data_rows": -3},
    {"data_dropped_target": True},
    {"data_label_7_rows": 40},  # a key clients do not send
])
def test_the_server_drops_a_report_value_of_the_wrong_form_and_logs_it_not_verbatim(lie, caplog):
    arrays = [np.zeros(2, dtype=np.float32)]
    honest = {"data_rows": 10, "data_dropped_target": 0, "data_single_class": 1}
    results = [(IdleProxy("liar"), fit_res(arrays, 10, {**honest, **lie}))]
    (key, value), = lie.items()
    with caplog.at_level("WARNING"):
        reports = data_quality(results, set())
    kept = {k.removeprefix("data_"): v for k, v in honest.items() if k != key}
    warnings = {"warnings": "single class"} if "single_class" in kept else {}
    assert reports == {"liar": {**{k: v for k, v in kept.items() if k != "single_class"},
                                **warnings}}
    assert value not in reports["liar"].values()
    logged = "\n".join(caplog.messages)  # the messages alone: a timestamp may hold "40"
    assert "liar" in logged and key in logged and type(value).__name__ in logged
    assert str(value)[:20] not in logged.replace(key, "")  # the value itself is never logged
