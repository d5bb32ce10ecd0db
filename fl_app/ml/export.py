"""Smaller copies of a trained model for devices: Keras 3's int8 quantization and a LiteRT
(TensorFlow Lite) file with int8 weights.

`int8_keras` quantizes a copy (`keras.Model.quantize("int8")`: int8 kernels with a
float32 scale per output channel, activations quantized on the fly), compiled as the
original was, so it loads and evaluates as any `.keras` file. `int8_tflite` converts with
TensorFlow's converter and `Optimize.DEFAULT` without a representative dataset: dynamic-
range quantization, int8 weights and float32 inputs and outputs. No calibration data is
needed, so nothing of the server's test set goes into the file. `tflite_predict` runs a
LiteRT file with the maintained `ai-edge-litert` interpreter when it is installed, else
TensorFlow's own (deprecated) `tf.lite.Interpreter`.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import keras
import numpy as np
import tensorflow as tf

from fl_app.ml.errors import ModelError


def int8_keras(model: keras.Model) -> keras.Model:
    """A copy of `model` (weights and compile settings) with int8 weights."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    if model.compiled:
        copy.compile_from_config(model.get_compile_config())
    with warnings.catch_warnings():  # input and pooling layers have nothing to quantize
        warnings.filterwarnings("ignore", message=".*does not have a `quantize` method")
        copy.quantize("int8")
    return copy


def int8_tflite(model: keras.Model) -> bytes:
    """`model` as a LiteRT flatbuffer with int8 weights (dynamic-range quantization)."""
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return converter.convert()


@lru_cache(maxsize=4)  # the CLI's preflight and the ServerApp check the same shared model
def check_exportable(model: keras.Model) -> None:
    """Raise ModelError, naming the model, unless both int8 copies can be made of it (a
    subclassed model cannot be cloned; a custom layer may not convert): found before any
    training, not after the last round. Checked once per model object."""
    try:
        int8_keras(model)
        int8_tflite(model)
    except Exception as err:  # Keras and the converter raise many kinds
        raise ModelError(f"model {model.name!r}: export-int8 cannot make its int8 copies: "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                         " (set export-int8=false)") from err


def _interpreter(content: bytes):  # noqa: ANN202  (ai-edge-litert or tf.lite, same API)
    """A LiteRT interpreter for `content`."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter  # noqa: N806
    with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation notice
        warnings.simplefilter("ignore")
        return Interpreter(model_content=content)


def tflite_predict(content: bytes, x: np.ndarray) -> np.ndarray:
    """The outputs of the LiteRT model `content` on the batch `x` (float32)."""
    interpreter = _interpreter(content)
    source = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(source["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], np.ascontiguousarray(x, dtype=np.float32))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
