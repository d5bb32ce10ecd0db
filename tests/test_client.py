"""KerasClient: shared per-process model without state leaks, FedProx, user .keras models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from fl_app.app.local_client import client_for
from fl_app.data.sources import data_source, load_partition
from fl_app.data.types import DataSettings
from fl_app.ml.trainer import TrainSettings, cached_trainer, trainer_for
from fl_app.wire import (
    KEY_CLIPPING_NORM,
    KEY_DP_NOISE_STD,
    KEY_FUSE_EVALUATE,
    KEY_LOSS_BEFORE,
    round_config,
)
from tests.conftest import data_settings, make_config

ROOT = Path(__file__).resolve().parent.parent
ADAM = dict(optimizer="adam", learning_rate=0.01, local_epochs=2)


def _global_weights(cfg) -> list[np.ndarray]:
    settings = DataSettings.from_config(cfg)
    train = TrainSettings.from_config(cfg)
    return [w.copy() for w in trainer_for(train, data_source(settings).spec).get_weights()]


def _fit(cfg, partition: int, weights) -> tuple[list[np.ndarray], int, dict]:
    client = client_for(cfg, {"partition-id": partition, "num-partitions": 10})
    return client.fit(weights, round_config(cfg, server_round=1))


FRESH_PROCESS_FIT = """
import json, sys
import numpy as np
from tests.test_client import ADAM, _fit, _global_weights
from tests.conftest import make_config
cfg = make_config(**ADAM)
weights, n, _ = _fit(cfg, 7, _global_weights(cfg))
np.savez(sys.argv[1], *weights)
print(json.dumps(n))
"""


def test_two_clients_in_one_process_equal_two_processes(tmp_path):
    cfg = make_config(**ADAM)
    start = _global_weights(cfg)
    first, _, _ = _fit(cfg, 3, start)           # leaves weights and Adam moments behind
    shared, n_shared, _ = _fit(cfg, 7, start)   # same process, same trainer

    out = tmp_path / "fresh.npz"
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS_FIT, str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(out) as fresh:
        fresh_weights = [fresh[f"arr_{i}"] for i in range(len(fresh.files))]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == n_shared
    for a, b in zip(shared, fresh_weights):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert any(not np.allclose(a, b) for a, b in zip(first, shared))


def test_dropout_masks_do_not_depend_on_earlier_clients(tmp_path):
    path = tmp_path / "dropout.keras"
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dropout(0.5), keras.layers.Dense(10)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    model.save(path)
    cfg = make_config(model=str(path))
    start = _global_weights(cfg)
    _fit(cfg, 3, start)                      # advances the Dropout layer's seed generator
    shared, _, _ = _fit(cfg, 7, start)
    cached_trainer.cache_clear()             # the next client gets a freshly loaded model
    fresh, _, _ = _fit(cfg, 7, start)
    for a, b in zip(shared, fresh):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_nodes_with_their_own_files_shuffle_differently(tmp_path):
    part = load_partition(data_settings(), 0, 10)
    paths = [tmp_path / name for name in ("a.npz", "b.npz")]
    for path in paths:  # the same examples on both nodes
        np.savez(path, x=part.train.x, y=part.train.y)
    cfg = make_config()
    start = _global_weights(cfg)
    fit = lambda path: client_for(cfg, {"data-path": str(path)}).fit(  # noqa: E731
        start, round_config(cfg, 1))[0]
    a, again, b = fit(paths[0]), fit(paths[0]), fit(paths[1])
    assert all(np.array_equal(x, y) for x, y in zip(a, again))
    assert any(not np.allclose(x, y) for x, y in zip(a, b))


def test_fit_reports_real_examples_and_metrics():
    cfg = make_config()
    client = client_for(cfg, {"partition-id": 2, "num-partitions": 10})
    weights, n, metrics = client.fit(_global_weights(cfg), round_config(cfg, 1))
    assert n == len(client.data.train) > 0
    assert {"train_loss", "train_accuracy", "train_seconds"} <= set(metrics)
    # where the message's time went: loading the data, building the trainer, training
    assert {"time_data", "time_model", "time_training"} <= set(metrics)
    assert metrics["time_training"] >= metrics["train_seconds"] > 0
    loss, n_eval, eval_metrics = client.evaluate(weights, {})
    assert n_eval == len(client.data.val) > 0
    assert np.isfinite(loss) and 0.0 <= eval_metrics["accuracy"] <= 1.0


def test_round_config_from_the_server_overrides_local_defaults():
    cfg = make_config()
    start = _global_weights(cfg)
    client = client_for(cfg, {"partition-id": 2, "num-partitions": 10})
    slow, _, _ = client.fit(start, {**round_config(cfg, 1), "learning-rate": 1e-6})
    fast, _, _ = client.fit(start, {**round_config(cfg, 1), "learning-rate": 0.5})
    moved = lambda ws: sum(float(np.sum((w - s) ** 2)) for w, s in zip(ws, start))  # noqa: E731
    assert moved(slow) < 1e-6 < moved(fast)


def test_fedprox_proximal_term_keeps_the_update_close_to_the_global_model():
    cfg = make_config()
    start = _global_weights(cfg)
    client = client_for(cfg, {"partition-id": 4, "num-partitions": 10})

    def distance(mu: float) -> float:
        weights, _, _ = client.fit(start, {**round_config(cfg, 1), "proximal_mu": mu})
        return float(np.sqrt(sum(np.sum((w - s) ** 2) for w, s in zip(weights, start))))

    assert distance(10.0) < 0.5 * distance(0.0)


def test_a_users_keras_file_is_trained(tmp_path):
    path = tmp_path / "tiny.keras"
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    model.save(path)
    cfg = make_config(model=str(path))
    client = client_for(cfg, {"partition-id": 0, "num-partitions": 10})
    start = client.get_parameters({})
    assert [w.shape for w in start] == [(64, 10), (10,)]
    weights, _, metrics = client.fit(start, round_config(cfg, 1))
    assert np.isfinite(metrics["train_loss"])
    assert not np.allclose(weights[0], start[0])


def test_a_keras_file_that_does_not_fit_the_data_is_refused(tmp_path):
    path = tmp_path / "wrong.keras"
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(3)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(True))
    model.save(path)
    with pytest.raises(ValueError, match="outputs 3 value"):
        client_for(make_config(model=str(path)), {"partition-id": 0, "num-partitions": 10})


def test_a_fused_fit_evaluates_the_received_weights_exactly_as_evaluate_does():
    """`fuse-evaluate`: the fit reply carries what a separate evaluate message would have
    returned for the same weights (bit for bit), and the fit itself is unchanged."""
    cfg = make_config()
    client = client_for(cfg, {"partition-id": 3, "num-partitions": 10})
    sent = _global_weights(cfg)
    loss, count, metrics = client.evaluate(sent, {})
    plain_weights, _, plain = client.fit(sent, round_config(cfg, 1))
    fused_weights, _, fused = client.fit(sent, {**round_config(cfg, 1),
                                                KEY_FUSE_EVALUATE: True})
    assert fused["eval_loss"] == loss and fused["eval_num_examples"] == count
    assert {k.removeprefix("eval_"): v for k, v in fused.items()
            if k.startswith("eval_") and k not in ("eval_loss", "eval_num_examples")} == metrics
    assert all(np.array_equal(a, b) for a, b in zip(plain_weights, fused_weights))
    assert not any(k.startswith("eval_") for k in plain)
    assert plain["train_loss"] == fused["train_loss"]


def test_a_fit_asked_for_its_loss_reports_the_received_models_loss_on_its_training_data():
    """q-FFL's F_k: the loss of the weights the client received, on its own training data
    (not its validation split), before training; the fit itself is unchanged."""
    cfg = make_config()
    client = client_for(cfg, {"partition-id": 3, "num-partitions": 10})
    sent = _global_weights(cfg)
    train = TrainSettings.from_config(cfg)
    trainer = trainer_for(train, data_source(DataSettings.from_config(cfg)).spec)
    trainer.set_weights(sent)
    expected, _ = trainer.evaluate(load_partition(DataSettings.from_config(cfg), 3, 10).train)
    trainer.forget()
    plain_weights, _, plain = client.fit(sent, round_config(cfg, 1))
    asked_weights, _, asked = client.fit(sent, {**round_config(cfg, 1), KEY_LOSS_BEFORE: True})
    assert asked[KEY_LOSS_BEFORE] == expected
    assert asked[KEY_LOSS_BEFORE] != client.evaluate(sent, {})[0]  # not the validation loss
    assert KEY_LOSS_BEFORE not in plain
    assert all(np.array_equal(a, b) for a, b in zip(plain_weights, asked_weights))


@pytest.mark.parametrize("dp", [{KEY_CLIPPING_NORM: 1.0},
                                {KEY_CLIPPING_NORM: 1.0, KEY_DP_NOISE_STD: 0.1}])
def test_a_client_side_dp_fit_does_not_send_its_loss_before(dp):
    """A deviating server asking for `loss_before` in a client-side DP round (clipping only,
    or distributed noise) gets no per-client loss: it is outside the DP accounting."""
    cfg = make_config()
    client = client_for(cfg, {"partition-id": 3, "num-partitions": 10})
    _, _, metrics = client.fit(_global_weights(cfg),
                               {**round_config(cfg, 1), KEY_LOSS_BEFORE: True, **dp})
    assert KEY_LOSS_BEFORE not in metrics
