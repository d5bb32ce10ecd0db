"""User `.keras` models: a softmax ending is recognised, so the loss is not applied to logits."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from fl_app.data.sources import DataSpec, Split
from fl_app.ml.models import build_model, outputs_probabilities
from fl_app.ml.trainer import KerasTrainer, make_optimizer

SPEC = DataSpec((6,), 3)


def _head(ending: str) -> list[keras.layers.Layer]:
    endings = {
        "logits": [keras.layers.Dense(3)],
        "dense-softmax": [keras.layers.Dense(3, activation="softmax")],
        "softmax-layer": [keras.layers.Dense(3), keras.layers.Softmax()],
        "activation-layer": [keras.layers.Dense(3), keras.layers.Activation("softmax")],
        "nested": [keras.Sequential([keras.layers.Dense(3), keras.layers.Softmax()])],
    }
    return endings[ending]


def _saved(tmp_path, ending: str) -> keras.Model:
    path = tmp_path / f"{ending}.keras"
    keras.Sequential([keras.Input(SPEC.input_shape), *_head(ending)]).save(path)
    return build_model(str(path), SPEC, seed=0)


@pytest.mark.parametrize("ending, probabilities", [
    ("logits", False), ("dense-softmax", True), ("softmax-layer", True),
    ("activation-layer", True), ("nested", True),
])
def test_a_saved_models_softmax_ending_is_recognised(tmp_path, ending, probabilities):
    model = _saved(tmp_path, ending)
    assert outputs_probabilities(model) is probabilities

    data = Split(np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32),
                 np.arange(8, dtype=np.int32) % 3)
    loss, _ = KerasTrainer(model, make_optimizer("sgd", 0.1)).evaluate(data)
    expected = keras.losses.sparse_categorical_crossentropy(
        data.y, model(data.x), from_logits=not probabilities)
    np.testing.assert_allclose(loss, float(np.mean(expected)), rtol=1e-5)
