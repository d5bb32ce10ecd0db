"""`task=auto` on a data file follows a user's model when its compiled loss settles the task,
and a loss that conflicts with the targets (or with an explicit task) is refused, naming both."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_diabetes

from fl_app.app.preflight import checked_trainer
from fl_app.data.sources import data_spec, load_partition
from fl_app.data.types import DataSettings
from fl_app.ml.errors import ModelError
from tests.conftest import make_config


def diabetes_csv(path) -> str:
    """scikit-learn's diabetes saved as a new user would: features and the raw `target`
    (25..346, integer-valued) in one CSV."""
    load_diabetes(as_frame=True).frame.to_csv(path, index=False)
    return str(path)


def saved_model(path, loss: str, units: int = 1, activation: str | None = None) -> str:
    """A small compiled model saved as a `.keras` file (the user's own model)."""
    model = keras.Sequential([keras.Input((10,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(units, activation=activation)])
    model.compile(optimizer="adam", loss=loss)
    model.save(path)
    return str(path)


def test_a_regression_model_on_integer_targets_is_a_regression_not_347_classes(tmp_path):
    cfg = make_config(dataset=diabetes_csv(tmp_path / "diabetes.csv"), label_column="target",
                      model="examples.keras_models:regression")  # the seed's adam/mse model
    trainer = checked_trainer(cfg)  # refused as "a 347-class classification" before
    settings = DataSettings.from_config(cfg)
    assert cfg["task"] == "regression" and data_spec(settings).task == "regression"
    assert trainer.spec.task == "regression"
    train = load_partition(DataSettings.from_config(cfg), 0, 10).train
    assert train.y.dtype == np.float32 and 25 <= train.y.min() and train.y.max() <= 346


@pytest.mark.parametrize("loss", ["mse", "mae", "huber", "mean_squared_error", "log_cosh",
                                  "mean_squared_logarithmic_error", "poisson"])
def test_every_regression_loss_settles_the_task(tmp_path, loss):
    cfg = make_config(dataset=diabetes_csv(tmp_path / "d.csv"), label_column="target",
                      model=saved_model(tmp_path / "m.keras", loss))
    assert cfg["task"] == "regression"


@pytest.mark.parametrize("loss, units, activation, task", [
    ("sparse_categorical_crossentropy", 3, "softmax", "multiclass"),
    ("categorical_crossentropy", 3, "softmax", "multiclass"),
    ("binary_crossentropy", 1, "sigmoid", "binary"),
])
def test_a_classification_loss_keeps_the_task_the_targets_give(tmp_path, loss, units,
                                                                activation, task):
    x = np.random.default_rng(0).normal(size=(300, 10))
    y = np.arange(300) % (3 if task == "multiclass" else 2)
    path = tmp_path / "c.csv"
    pd.DataFrame(x).assign(label=y).to_csv(path, index=False)
    cfg = make_config(dataset=str(path), model=saved_model(tmp_path / "m.keras", loss, units,
                                                           activation))
    assert cfg["task"] == "auto" and data_spec(DataSettings.from_config(cfg)).task == task
    checked_trainer(cfg)


def test_a_builder_model_still_reads_the_task_from_the_targets(tmp_path):
    cfg = make_config(dataset=diabetes_csv(tmp_path / "d.csv"), label_column="target")
    assert cfg["task"] == "auto" and data_spec(DataSettings.from_config(cfg)).num_classes == 347


def test_a_crossentropy_loss_on_a_non_integer_target_is_refused_naming_both(tmp_path):
    frame = load_diabetes(as_frame=True).frame
    path = tmp_path / "d.csv"
    frame.assign(target=frame["target"] / 7.0).to_csv(path, index=False)
    model = saved_model(tmp_path / "m.keras", "sparse_categorical_crossentropy", 3, "softmax")
    with pytest.raises(ModelError, match=r"model .*m\.keras.* sparse_categorical_crossentropy.*"
                                        r"label column 'target' of data file .*d\.csv.* "
                                        r"non-integer"):
        make_config(dataset=str(path), label_column="target", model=model)


def test_binary_crossentropy_on_soft_targets_in_0_1_is_a_regression_not_a_conflict(tmp_path):
    x = np.random.default_rng(0).normal(size=(200, 10))
    path = tmp_path / "soft.csv"
    pd.DataFrame(x).assign(label=np.linspace(0.05, 0.95, 200)).to_csv(path, index=False)
    cfg = make_config(dataset=str(path),
                      model=saved_model(tmp_path / "m.keras", "binary_crossentropy", 1, "sigmoid"))
    assert data_spec(DataSettings.from_config(cfg)).task == "regression"
    checked_trainer(cfg)


def test_an_explicit_task_that_the_loss_contradicts_is_refused_naming_both(tmp_path):
    data = diabetes_csv(tmp_path / "d.csv")
    mse = saved_model(tmp_path / "mse.keras", "mse", 347)
    with pytest.raises(ModelError, match="mean_squared_error.*regression loss.*task='multiclass'"):
        checked_trainer(make_config(dataset=data, label_column="target", task="multiclass",
                                    model=mse))
    crossentropy = saved_model(tmp_path / "ce.keras", "sparse_categorical_crossentropy")
    with pytest.raises(ModelError, match="sparse_categorical_crossentropy.*task='regression'"):
        checked_trainer(make_config(dataset=data, label_column="target", task="regression",
                                    model=crossentropy))
