"""`export-int8`: the final model as int8 copies (Keras 3 quantization, a LiteRT file), their
sizes and their metrics on the server's test set next to float32's."""

from __future__ import annotations

import json
import stat

import keras
import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters

from fl_app.app.server_app import run_parts
from fl_app.data.sources import data_source
from fl_app.data.types import DataSettings
from fl_app.ml.export import int8_tflite, tflite_predict
from fl_app.schema import ConfigError
from fl_app.server.export import INT8_KERAS_FILE, INT8_TFLITE_FILE
from fl_app.server.outputs import MODEL_FILE
from tests.conftest import make_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The run's parts for the default workload with `export-int8`, and weights trained
    centrally for a few epochs on one client's partition (a model worth quantizing)."""
    out = tmp_path_factory.mktemp("export")
    cfg = make_config(export_int8=True, out_dir=str(out))
    parts = run_parts(cfg)
    trainer = parts.recorder.trainer
    trainer.set_weights(parts.initial_weights)
    settings = DataSettings.from_config(cfg)
    trainer.fit(data_source(settings).partition(0, 2), epochs=20, batch_size=32)
    return cfg, parts, trainer.get_weights(), out


def test_the_final_model_is_also_written_as_int8_copies_with_their_metrics(trained):
    cfg, parts, weights, out = trained
    parts.recorder.on_round({"round": 0, "seconds": 0.0, "centralized": {}},
                            ndarrays_to_parameters(weights))
    parts.recorder.on_finish("num-server-rounds", ndarrays_to_parameters(weights))
    export = json.loads((out / "history.json").read_text())["summary"]["export"]
    assert list(export) == ["float32", "int8-keras", "int8-tflite"]
    for row in export.values():
        assert stat.S_IMODE((out / row["file"]).stat().st_mode) == 0o600
        assert row["bytes"] == (out / row["file"]).stat().st_size
    assert export["float32"]["file"] == MODEL_FILE
    float_accuracy = export["float32"]["accuracy"]
    assert float_accuracy > 0.8  # trained: the comparison means something
    for variant in ("int8-keras", "int8-tflite"):
        assert abs(export[variant]["accuracy"] - float_accuracy) < 0.03, export
    assert export["int8-tflite"]["bytes"] < export["float32"]["bytes"] / 2
    loaded = keras.models.load_model(out / INT8_KERAS_FILE)
    assert "int8" in {v.dtype for v in loaded.weights}  # quantized, not a float copy
    assert loaded.compiled and loaded.get_compile_config()["loss"] == \
        parts.recorder.trainer.model.get_compile_config()["loss"]
    content = (out / INT8_TFLITE_FILE).read_bytes()
    test = data_source(DataSettings.from_config(cfg)).test_set()
    assert tflite_predict(content, test.x[:5]).shape == (5, 10)


def test_metrics_of_outside_predictions_are_evaluates_own(trained):
    """The int8 copies are scored by the float model's compiled loss and metrics: on the
    float model's own predictions that gives exactly `evaluate`'s figures."""
    cfg, parts, weights, _ = trained
    trainer = parts.recorder.trainer
    trainer.set_weights(weights)
    test = data_source(DataSettings.from_config(cfg)).test_set()
    loss, metrics = trainer.evaluate(test)
    outside_loss, outside = trainer.evaluate_predictions(
        test, trainer.model.predict(test.x, verbose=0))
    assert outside_loss == pytest.approx(loss, rel=1e-5)
    assert outside == pytest.approx(metrics, rel=1e-5)


def test_the_litert_file_holds_int8_weights(trained):
    cfg, parts, weights, _ = trained
    trainer = parts.recorder.trainer
    trainer.set_weights(weights)
    content = int8_tflite(trainer.model)
    float_bytes = sum(w.nbytes for w in weights)
    assert len(content) < float_bytes / 2  # int8 kernels: about a quarter, plus the graph
    test = data_source(DataSettings.from_config(cfg)).test_set()
    got = tflite_predict(content, test.x)
    want = trainer.model.predict(test.x, verbose=0)
    assert np.mean(got.argmax(1) == want.argmax(1)) > 0.95


def test_export_int8_is_refused_with_homomorphic_encryption():
    with pytest.raises(ConfigError, match="'export-int8'.*homomorphic-encryption"):
        make_config(export_int8=True, homomorphic_encryption="ckks")


def test_a_model_that_cannot_be_quantized_is_refused_before_training():
    """A subclassed model cannot be cloned for its int8 copy: one error naming the model,
    from the preflight check, not a crash after the last round."""
    from fl_app.ml.errors import ModelError
    from fl_app.ml.export import check_exportable

    class Subclassed(keras.Model):
        def __init__(self) -> None:
            super().__init__(name="mine")
            self.dense = keras.layers.Dense(10, activation="softmax")

        def call(self, inputs):
            return self.dense(inputs)

    model = Subclassed()
    model(np.zeros((1, 64), np.float32))
    model.compile(loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    with pytest.raises(ModelError, match="model 'mine': export-int8 cannot make"):
        check_exportable(model)
