"""Keras model builders by name, sized from the dataset, or a user's `.keras` file."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import keras
import numpy as np

from fl_app.data.sources import DataSpec


def _kernel(seed: int, layer: int) -> keras.initializers.Initializer:
    """A Glorot-uniform initializer seeded per layer.

    Explicit seeds keep initial weights reproducible even when other threads (Flower's,
    Ray's) draw from the global RNGs that Keras' unseeded initializers start from.
    """
    return keras.initializers.GlorotUniform(seed=seed * 1000 + layer)


def _logreg(spec: DataSpec, seed: int) -> keras.Model:
    return keras.Sequential([
        keras.Input(spec.input_shape),
        keras.layers.Flatten(),
        keras.layers.Dense(spec.num_classes, activation="softmax",
                           kernel_initializer=_kernel(seed, 0)),
    ], name="logreg")


def _mlp(spec: DataSpec, seed: int) -> keras.Model:
    return keras.Sequential([
        keras.Input(spec.input_shape),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu", kernel_initializer=_kernel(seed, 0)),
        keras.layers.Dense(spec.num_classes, activation="softmax",
                           kernel_initializer=_kernel(seed, 1)),
    ], name="mlp")


def _image_shape(spec: DataSpec) -> tuple[int, int, int]:
    """Interpret the input as an image: (h, w, c), or a square grey image if flat."""
    if len(spec.input_shape) == 3:
        return spec.input_shape  # type: ignore[return-value]
    if len(spec.input_shape) == 2:
        return (*spec.input_shape, 1)  # type: ignore[return-value]
    side = int(round(np.sqrt(spec.input_shape[0])))
    if side * side != spec.input_shape[0]:
        raise ValueError(f"model 'cnn' needs image-shaped or square inputs, got {spec.input_shape}")
    return (side, side, 1)


def _cnn(spec: DataSpec, seed: int) -> keras.Model:
    return keras.Sequential([
        keras.Input(spec.input_shape),
        keras.layers.Reshape(_image_shape(spec)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu",
                            kernel_initializer=_kernel(seed, 0)),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu",
                            kernel_initializer=_kernel(seed, 1)),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(spec.num_classes, activation="softmax",
                           kernel_initializer=_kernel(seed, 2)),
    ], name="cnn")


MODEL_BUILDERS: dict[str, Callable[[DataSpec, int], keras.Model]] = {
    "logreg": _logreg,
    "mlp": _mlp,
    "cnn": _cnn,
}


def load_model_file(path_str: str, spec: DataSpec) -> keras.Model:
    """Load a user's `.keras` model and check that it fits the data; errors name the file."""
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise ValueError(f"run-config key 'model': file {path} does not exist")
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as err:  # Keras raises many kinds for a bad archive
        raise ValueError(f"run-config key 'model': cannot load {path}: {err}") from err
    in_shape = tuple(model.input_shape[1:])
    if int(np.prod(in_shape)) != int(np.prod(spec.input_shape)):
        raise ValueError(f"model file {path} expects inputs {in_shape} but the dataset has "
                         f"{spec.input_shape}")
    if model.output_shape[-1] != spec.num_classes:
        raise ValueError(f"model file {path} outputs {model.output_shape[-1]} classes but the "
                         f"dataset has {spec.num_classes}")
    return model


def build_model(name: str, spec: DataSpec, seed: int) -> keras.Model:
    """Build model `name` (builder name or `.keras` path) with seeded initial weights."""
    if name.endswith(".keras"):
        return load_model_file(name, spec)
    return MODEL_BUILDERS[name](spec, seed)


def outputs_probabilities(model: keras.Model) -> bool:
    """True when the model ends in a softmax (its outputs are probabilities, not logits).

    A softmax ending is a `Softmax` layer, an `Activation("softmax")` layer or a layer
    with `activation="softmax"` (such as `Dense`), also as the last layer of a nested model.
    """
    last = model.layers[-1]
    if isinstance(last, keras.Model):
        return outputs_probabilities(last)
    if isinstance(last, keras.layers.Softmax):
        return True
    activation = getattr(last, "activation", None)
    return getattr(activation, "__name__", "") == "softmax"
