"""`fl_app.api.run`: a notebook's compiled model and arrays, trained federatedly by the real
simulation engine, with the same outputs as run_simulation.py."""

from __future__ import annotations

import tempfile
from pathlib import Path

import keras
import pytest
from sklearn.datasets import load_breast_cancer

from fl_app.api import run
from fl_app.ml.errors import ModelError
from fl_app.server.callbacks import Callback

pytestmark = pytest.mark.slow  # runs Flower simulations


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)  # the initializer's draw: repeatable thresholds below
    model = keras.Sequential([keras.Input((30,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(name="auc")])
    return model


class Recording(Callback):
    """Keeps every call it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def on_run_begin(self, config, startup_seconds):
        self.calls.append(("begin", config["num-server-rounds"], startup_seconds))

    def on_round_end(self, server_round, record):
        self.calls.append(("round", server_round, record))
        record["centralized"] = {}  # a callback's copy: what is saved stays

    def on_run_end(self, history):
        self.calls.append(("end", history["stopped"], history["summary"]))


def test_run_trains_a_notebook_model_on_arrays(tmp_path):
    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    before = set(Path(tempfile.gettempdir()).glob("fl-keras-*"))
    recording = Recording()
    history = run(_model(), x, y, num_clients=4, out_dir=tmp_path, num_server_rounds=3,
                  local_epochs=2, partitioner="dirichlet", dirichlet_alpha=1.0,
                  callbacks=[recording])
    rounds = history["rounds"]
    assert history["stopped"] == "num-server-rounds" and len(rounds) == 4
    assert set(rounds[-1]["centralized"]) == {"loss", "auc"}  # the compiled metric, by name
    assert rounds[-1]["centralized"]["auc"] > 0.95
    assert all(r["fit"]["num_clients"] == 4 for r in rounds[1:])
    assert (tmp_path / "final_model.keras").is_file() and (tmp_path / "history.json").is_file()
    assert set(Path(tempfile.gettempdir()).glob("fl-keras-*")) == before  # handed-over files gone
    # the callback saw the start-up, every round's record as saved, then the end
    begin, *per_round, end = recording.calls
    assert begin[:2] == ("begin", 3) and begin[2] > 0
    assert [call[:2] for call in per_round] == [("round", r) for r in range(4)]
    assert [{**call[2], "centralized": r["centralized"]} for call, r in zip(per_round, rounds)
            ] == rounds
    assert end == ("end", "num-server-rounds", history["summary"])


def test_run_refuses_a_model_that_does_not_fit_before_training(tmp_path):
    x, y = load_breast_cancer(return_X_y=True)
    wrong = keras.Sequential([keras.Input((30,)), keras.layers.Dense(3)])
    wrong.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ModelError, match="outputs 3 value"):
        run(wrong, x, y, num_clients=2, out_dir=tmp_path)
    assert not (tmp_path / "history.json").exists()
