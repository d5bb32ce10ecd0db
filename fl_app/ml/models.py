"""Where a run's Keras model comes from, always compiled: a builder by name (compiled with a
default for the task), a user's `.keras` file (with its own compiled loss, metrics and
optimizer) or a user's `package.module:function` that returns a compiled model.

`check_fits` compares a model with the data before any training: input size, output units
and what its loss expects of the targets; `loss_task` says which task a compiled loss
settles (`fl_app.ml.task` lets it decide `task='auto'`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from fl_app.data.sources import DataSpec
from fl_app.ml.errors import ModelError
from fl_app.schema import did_you_mean


def _kernel(seed: int, layer: int) -> keras.initializers.Initializer:
    """A Glorot-uniform initializer seeded per layer.

    Explicit seeds keep initial weights reproducible even when other threads (Flower's,
    Ray's) draw from the global RNGs that Keras' unseeded initializers start from.
    """
    return keras.initializers.GlorotUniform(seed=seed * 1000 + layer)


def _head(spec: DataSpec, seed: int, layer: int) -> keras.layers.Layer:
    """The output layer for the task: softmax, sigmoid or linear units."""
    activation = {"multiclass": "softmax", "binary": "sigmoid",
                  "multilabel": "sigmoid"}.get(spec.task)
    return keras.layers.Dense(spec.output_units, activation=activation,
                              kernel_initializer=_kernel(seed, layer))


def _logreg(spec: DataSpec, seed: int) -> keras.Model:
    return keras.Sequential([keras.Input(spec.input_shape), keras.layers.Flatten(),
                             _head(spec, seed, 0)], name="logreg")


def _mlp(spec: DataSpec, seed: int) -> keras.Model:
    return keras.Sequential([
        keras.Input(spec.input_shape),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu", kernel_initializer=_kernel(seed, 0)),
        _head(spec, seed, 1),
    ], name="mlp")


def _image_shape(spec: DataSpec) -> tuple[int, int, int]:
    """Interpret the input as an image: (h, w, c), or a square grey image if flat."""
    if len(spec.input_shape) == 3:
        return spec.input_shape
    if len(spec.input_shape) == 2:
        return (*spec.input_shape, 1)
    side = int(round(np.sqrt(spec.input_shape[0])))
    if side * side != spec.input_shape[0]:
        raise ModelError(f"the CNN models need image-shaped or square inputs, got "
                         f"{spec.input_shape}")
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
        _head(spec, seed, 2),
    ], name="cnn")


def vgg_cnn(spec: DataSpec, seed: int, widths: tuple[int, ...], dense: int,
            name: str) -> keras.Model:
    """A VGG-style CNN for small images: per width two 3x3 ReLU convolutions and a 2x2
    max-pooling, then a ReLU dense layer of `dense` units and the task's head.

    Its input shape is the data's (`spec`; flat inputs are read as square grey images),
    so it takes CIFAR's 32x32x3 as well as any other image size. On 32x32x3 inputs with
    10 classes: widths (32, 64, 128) and 384 dense units make 1,077,674 weights
    (`cnn-1m`), widths (64, 128, 256) and 2048 units 9,556,554 (`cnn-10m`).
    """
    layers: list[keras.layers.Layer] = [keras.Input(spec.input_shape),
                                        keras.layers.Reshape(_image_shape(spec))]
    for i, width in enumerate(widths):
        for j in range(2):
            layers.append(keras.layers.Conv2D(width, 3, padding="same", activation="relu",
                                              kernel_initializer=_kernel(seed, 2 * i + j)))
        layers.append(keras.layers.MaxPooling2D(2))
    layers += [keras.layers.Flatten(),
               keras.layers.Dense(dense, activation="relu",
                                  kernel_initializer=_kernel(seed, 2 * len(widths))),
               _head(spec, seed, 2 * len(widths) + 1)]
    return keras.Sequential(layers, name=name)


def _cnn_1m(spec: DataSpec, seed: int) -> keras.Model:
    """`model='cnn-1m'`: `vgg_cnn` with widths (32, 64, 128) and 384 dense units (1.08 M
    weights on 32x32x3 images, 10 classes)."""
    return vgg_cnn(spec, seed, (32, 64, 128), 384, "cnn_1m")


def _cnn_10m(spec: DataSpec, seed: int) -> keras.Model:
    """`model='cnn-10m'`: `vgg_cnn` with widths (64, 128, 256) and 2048 dense units (9.56 M
    weights on 32x32x3 images, 10 classes)."""
    return vgg_cnn(spec, seed, (64, 128, 256), 2048, "cnn_10m")


MODEL_BUILDERS: dict[str, Callable[[DataSpec, int], keras.Model]] = {
    "logreg": _logreg,
    "mlp": _mlp,
    "cnn": _cnn,
    "cnn-1m": _cnn_1m,
    "cnn-10m": _cnn_10m,
}

# How a builder's model is compiled, per task: (optimizer, loss, metrics). SGD(0.1) is the
# rate the app's default digits run was tuned with; regression targets are on their own
# scale (diabetes: 25..346), which Adam copes with where plain SGD diverges.
DEFAULT_COMPILE: dict[str, tuple[Callable[[], keras.optimizers.Optimizer], str, list[str]]] = {
    "multiclass": (lambda: keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy",
                   ["accuracy"]),
    "binary": (lambda: keras.optimizers.SGD(0.1), "binary_crossentropy", ["accuracy"]),
    "multilabel": (lambda: keras.optimizers.SGD(0.1), "binary_crossentropy",
                   ["binary_accuracy"]),
    "regression": (lambda: keras.optimizers.Adam(0.01), "mse", ["mae"]),
}


def _build_named(name: str, spec: DataSpec, seed: int) -> keras.Model:
    model = MODEL_BUILDERS[name](spec, seed)
    optimizer, loss, metrics = DEFAULT_COMPILE[spec.task]
    model.compile(optimizer=optimizer(), loss=loss, metrics=metrics)
    return model


def _load_file(path_str: str) -> keras.Model:
    """A user's `.keras` file, with the loss, metrics and optimizer it was compiled with."""
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise ModelError(f"run-config key 'model': file {path} does not exist")
    try:
        return keras.models.load_model(path, compile=True)
    except Exception as err:  # Keras raises many kinds for a bad archive or unknown objects
        raise ModelError(
            f"run-config key 'model': cannot load {path}: {type(err).__name__}: {err} (custom "
            "layers, losses or metrics must be registered with "
            "@keras.saving.register_keras_serializable, or use model='package.module:function')"
        ) from err


def _call_function(reference: str, spec: DataSpec, seed: int) -> keras.Model:
    """Import `package.module:function` and call it, with the data spec if it takes one."""
    module_name, _, function_name = reference.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ModelError(f"run-config key 'model': cannot import {reference}: "
                         f"{type(err).__name__}: {err}") from err
    function = getattr(module, function_name, None)
    if not callable(function):
        names = [name for name, value in vars(module).items()
                 if callable(value) and not name.startswith("_")]
        raise ModelError(f"run-config key 'model': module {module_name} has no function "
                         f"{function_name!r}{did_you_mean(function_name, names)}")
    keras.utils.set_random_seed(seed)  # the function's unseeded initializers are reproducible
    takes_spec = bool(inspect.signature(function).parameters)
    try:
        model = function(spec) if takes_spec else function()
    except Exception as err:  # the user's code may raise anything
        raise ModelError(f"model function {reference} raised {type(err).__name__}: {err}") from err
    if not isinstance(model, keras.Model):
        raise ModelError(f"model function {reference} returned {type(model).__name__}, "
                         "not a keras.Model")
    return model


def is_function_reference(name: str) -> bool:
    """Whether a `model` value names a `package.module:function`."""
    module_name, sep, function_name = name.partition(":")
    return bool(sep and module_name and function_name.isidentifier()
                and all(part.isidentifier() for part in module_name.split(".")))


def make_model(name: str, spec: DataSpec, seed: int) -> keras.Model:
    """The model `name` names (builder, `.keras` path or `module:function`), as it comes:
    not checked against `spec` (`build_model` checks it). Raises ModelError naming the file
    or function when it cannot be had."""
    if name in MODEL_BUILDERS:
        return _build_named(name, spec, seed)
    if is_function_reference(name):
        return _call_function(name, spec, seed)
    return _load_file(name)


def build_model(name: str, spec: DataSpec, seed: int) -> keras.Model:
    """The compiled, built model `name` names (builder, `.keras` path or `module:function`).

    Raises ModelError naming the file or function when it cannot be had, is not compiled
    or does not fit `spec` (see `check_fits`).
    """
    model = make_model(name, spec, seed)
    origin = f"model {name!r}"
    if not getattr(model, "compiled", False) or getattr(model, "optimizer", None) is None:
        raise ModelError(f"{origin} is not compiled: call model.compile(optimizer=..., loss=..., "
                         "metrics=[...]) before returning or saving it (its loss, metrics and "
                         "optimizer are what the clients train with)")
    if not model.built:  # a subclassed model gets its weights on its first call
        model(np.zeros((1, *spec.input_shape), dtype=np.float32))
    check_fits(model, spec, origin)
    return model


def loss_name(model: keras.Model) -> str:
    """The compiled loss's Keras name (`sparse_categorical_crossentropy`, `mse`, ...)."""
    loss = model.loss
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    return str(getattr(loss, "name", None) or getattr(loss, "__name__", type(loss).__name__))


ONE_HOT_LOSSES = ("categorical_crossentropy", "categorical_focal_crossentropy",
                  "categorical_hinge")


def wants_one_hot(model: keras.Model) -> bool:
    """Whether the model's loss takes one-hot targets (categorical cross-entropy and kin)."""
    return loss_name(model) in ONE_HOT_LOSSES


# Keras' built-in losses by the task they settle (by `loss_name`); any other loss (custom,
# kl_divergence, cosine_similarity) settles none.
REGRESSION_LOSSES = ("mean_squared_error", "mean_absolute_error",
                     "mean_absolute_percentage_error", "mean_squared_logarithmic_error",
                     "huber", "huber_loss", "log_cosh", "poisson")
CLASS_INDEX_LOSSES = ("sparse_categorical_crossentropy", *ONE_HOT_LOSSES)
SOFT_TARGET_LOSSES = ("binary_crossentropy", "binary_focal_crossentropy")  # any y in [0, 1]
CLASSIFICATION_LOSSES = (*CLASS_INDEX_LOSSES, *SOFT_TARGET_LOSSES, "hinge", "squared_hinge")


def loss_task(model: keras.Model) -> str | None:
    """The task the compiled loss settles: "regression", "classification" or None."""
    name = loss_name(model)
    if name in REGRESSION_LOSSES:
        return "regression"
    return "classification" if name in CLASSIFICATION_LOSSES else None


def _check_loss_task(model: keras.Model, spec: DataSpec, origin: str) -> None:
    """Refuse a loss that cannot train the task: a regression loss on class indices, a
    class-index loss on continuous values."""
    name = loss_name(model)
    if spec.task == "multiclass" and name in REGRESSION_LOSSES:
        raise ModelError(f"{origin} is compiled with {name}, a regression loss, but the data is "
                         f"{spec.describe()} (task='multiclass'): set run-config key "
                         "task='regression' (or 'auto') for a data file, or compile the model "
                         "with a classification loss")
    if spec.task == "regression" and name in CLASS_INDEX_LOSSES:
        raise ModelError(f"{origin} is compiled with {name}, which takes class indices, but the "
                         f"data is {spec.describe()} (task='regression'): compile it with a "
                         "regression loss (mse, mae, huber, ...) or set run-config key task "
                         "to the classes' task")


def check_fits(model: keras.Model, spec: DataSpec, origin: str) -> None:
    """Raise ModelError naming `origin` if the model's input or output does not fit `spec`."""
    in_shape = tuple(model.input_shape[1:]) if _has_input_shape(model) else spec.input_shape
    if None not in in_shape and int(np.prod(in_shape)) != int(np.prod(spec.input_shape)):
        raise ModelError(f"{origin} expects inputs {in_shape} but the dataset has "
                         f"{spec.input_shape}")
    try:
        out = model(np.zeros((1, *spec.input_shape), dtype=np.float32), training=False)
    except Exception as err:  # a user model may raise anything on inputs it does not take
        raise ModelError(f"{origin} cannot take the dataset's inputs {spec.input_shape}: "
                         f"{type(err).__name__}: {err}") from err
    if not hasattr(out, "shape"):
        raise ModelError(f"{origin} has {len(out)} outputs ({type(out).__name__}); the app "
                         "trains single-output models")
    units = int(out.shape[-1]) if len(out.shape) > 1 else 1
    allowed = {spec.output_units}
    if spec.task == "binary":
        allowed.add(2)  # two softmax units with a (sparse) categorical loss
    if units not in allowed:
        raise ModelError(f"{origin} outputs {units} value(s) per example but the dataset is "
                         f"{spec.describe()}, which needs {spec.output_units}"
                         + _task_hint(units, spec))
    one_hot = wants_one_hot(model)
    if one_hot and (spec.task not in ("multiclass", "binary") or units < 2):
        raise ModelError(f"{origin} is compiled with {loss_name(model)}, which takes one-hot "
                         f"classes, but it outputs {units} value(s) for {spec.describe()}")
    _check_loss_task(model, spec, origin)


def _has_input_shape(model: keras.Model) -> bool:
    try:
        return bool(model.input_shape)
    except (AttributeError, ValueError):  # subclassed models have no declared input
        return False


def _task_hint(units: int, spec: DataSpec) -> str:
    if units == 1 and spec.task == "multiclass":
        return ("; a one-output model fits a regression or binary dataset (dataset='diabetes', "
                "'breast-cancer', or your own file with task='regression')")
    return ""
