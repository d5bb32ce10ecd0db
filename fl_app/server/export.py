"""`export-int8`: the final model also as int8 copies for devices, with their size and their
loss and metrics on the server's test set next to the float32 model's.

Writes `final_model.int8.keras` (Keras 3 int8 quantization) and `final_model.int8.tflite`
(a LiteRT file with int8 weights), 0600 like every output; see `fl_app.ml.export`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from fl_app.data.sources import Split
from fl_app.ml.export import int8_keras, int8_tflite, tflite_predict
from fl_app.ml.trainer import EVAL_CHUNK, KerasTrainer
from fl_app.server.outputs import MODEL_FILE, atomic_write_bytes, private_files

INT8_KERAS_FILE = "final_model.int8.keras"
INT8_TFLITE_FILE = "final_model.int8.tflite"


def _row(path: Path, result: tuple[float, dict[str, float]]) -> dict[str, Any]:
    loss, metrics = result
    return {"file": path.name, "bytes": path.stat().st_size, "loss": loss, **metrics}


def export_int8(trainer: KerasTrainer, test: Split, out_dir: Path) -> dict[str, dict[str, Any]]:
    """Write the int8 copies of `trainer.model` (the final model, saved as `MODEL_FILE`
    already) into `out_dir`; each file's size, loss and compiled metrics on `test`, by
    variant (`float32`, `int8-keras`, `int8-tflite`)."""
    model = trainer.model
    report = {"float32": _row(out_dir / MODEL_FILE, trainer.evaluate(test))}
    quantized = int8_keras(model)
    with private_files(), tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        partial = Path(tmp) / INT8_KERAS_FILE  # a fresh private folder: no name to plant
        quantized.save(partial)
        os.replace(partial, out_dir / INT8_KERAS_FILE)  # whole, never half-written
    predicted = quantized.predict(test.x, batch_size=EVAL_CHUNK, verbose=0)
    report["int8-keras"] = _row(out_dir / INT8_KERAS_FILE,
                                trainer.evaluate_predictions(test, predicted))
    content = int8_tflite(model)
    atomic_write_bytes(out_dir / INT8_TFLITE_FILE, content)
    report["int8-tflite"] = _row(out_dir / INT8_TFLITE_FILE, trainer.evaluate_predictions(
        test, tflite_predict(content, test.x)))
    return report
