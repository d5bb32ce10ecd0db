"""The fast path honours `model.compile()`: loss, metrics, optimizer and regularization of
builder, `.keras` and `module:function` models train exactly as Keras would train them."""

from __future__ import annotations

import textwrap

import keras
import numpy as np
import pytest

from fl_app.data.sources import (
    BREAST_CANCER_SPEC,
    DIABETES_SPEC,
    DIGITS_SPEC,
    MULTILABEL_SPEC,
    DataSpec,
    Split,
)
from fl_app.ml.models import ModelError, build_model, check_fits, loss_name
from fl_app.ml.trainer import (
    KerasTrainer,
    TrainSettings,
    cached_trainer,
    fresh_optimizer,
    trainer_for,
)
from tests.conftest import make_config

SPEC = DataSpec((6,), 3)
RNG = np.random.default_rng(0)


def _data(spec: DataSpec, n: int = 24, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, *spec.input_shape)).astype(np.float32)
    if spec.task == "multiclass":
        y = np.arange(n) % spec.num_classes
    elif spec.task == "binary":
        y = np.arange(n) % 2
    elif spec.task == "multilabel":
        y = rng.integers(0, 2, (n, spec.num_classes))
    else:
        return Split(x, rng.normal(3.0, 2.0, n).astype(np.float32))
    return Split(x, y.astype(np.int32))


def _one_full_batch_step(model: keras.Model, spec: DataSpec, data: Split) -> list[np.ndarray]:
    """Our trainer's weights after one epoch of one full batch (the order does not matter)."""
    trainer = KerasTrainer(model, spec)
    trainer.fit(data, epochs=1, batch_size=len(data))
    return trainer.get_weights()


def _keras_step(model: keras.Model, spec: DataSpec, data: Split) -> list[np.ndarray]:
    """Keras' own `train_on_batch` with the model's compiled loss and optimizer."""
    trainer = KerasTrainer(model, spec)  # only to encode the targets the same way
    model.train_on_batch(data.x, trainer.targets(data.y))
    return model.get_weights()


def _assert_same_training(make: callable, spec: DataSpec) -> None:
    """A model from `make()` trains one step to the same weights as Keras' train_on_batch,
    and evaluates to the same loss and metrics as `model.evaluate`."""
    data = _data(spec)
    ours = _one_full_batch_step(make(), spec, data)
    reference_model = make()
    theirs = _keras_step(reference_model, spec, data)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)
    trainer = KerasTrainer(make(), spec)
    loss, metrics = trainer.evaluate(data)
    expected = reference_model.evaluate(data.x, trainer.targets(data.y), verbose=0,
                                        batch_size=len(data), return_dict=True)
    trainer.set_weights(reference_model.get_weights())
    loss, metrics = trainer.evaluate(data)
    assert loss == pytest.approx(expected.pop("loss"), rel=1e-5)
    assert metrics == pytest.approx(expected, rel=1e-5)


def _sequential(spec: DataSpec, head: callable, loss, metrics=("accuracy",), optimizer=None,
                regularizer=None) -> keras.Model:
    """A small compiled Sequential; `head()` makes its output layers (after seeding, so
    two calls build the same initial weights)."""
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input(spec.input_shape),
                              keras.layers.Dense(8, activation="relu",
                                                 kernel_regularizer=regularizer), *head()])
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.1), loss=loss,
                  metrics=list(metrics))
    return model


BINARY = DataSpec((6,), 2, task="binary")
REGRESSION = DataSpec((6,), 0, task="regression")
MULTILABEL = DataSpec((6,), 4, task="multilabel")

LOSS_CASES = {
    "mse": (REGRESSION, lambda: [keras.layers.Dense(1)], "mse", ["mae"]),
    "mae": (REGRESSION, lambda: [keras.layers.Dense(1)], "mae", ["mse"]),
    "huber": (REGRESSION, lambda: [keras.layers.Dense(1)], keras.losses.Huber(delta=0.5),
              [keras.metrics.RootMeanSquaredError()]),
    "binary-probabilities": (BINARY, lambda: [keras.layers.Dense(1, activation="sigmoid")],
                             "binary_crossentropy", ["accuracy", keras.metrics.AUC()]),
    "binary-logits": (BINARY, lambda: [keras.layers.Dense(1)],
                      keras.losses.BinaryCrossentropy(from_logits=True),
                      [keras.metrics.BinaryAccuracy(threshold=0.0)]),
    "categorical-probabilities": (SPEC, lambda: [keras.layers.Dense(3, activation="softmax")],
                                  "categorical_crossentropy", ["accuracy"]),
    "categorical-logits": (SPEC, lambda: [keras.layers.Dense(3)],
                           keras.losses.CategoricalCrossentropy(from_logits=True),
                           [keras.metrics.CategoricalAccuracy()]),
    "sparse-logits": (SPEC, lambda: [keras.layers.Dense(3)],
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), ["accuracy"]),
    "sparse-softmax-layer": (SPEC, lambda: [keras.layers.Dense(3), keras.layers.Softmax()],
                             "sparse_categorical_crossentropy", ["accuracy"]),
    "multilabel": (MULTILABEL, lambda: [keras.layers.Dense(4, activation="sigmoid")],
                   "binary_crossentropy", [keras.metrics.Precision(), keras.metrics.Recall()]),
    "custom-function": (REGRESSION, lambda: [keras.layers.Dense(1)],
                        lambda y_true, y_pred: keras.ops.mean(keras.ops.abs(y_true - y_pred) ** 3),
                        ["mae"]),
}


@pytest.mark.parametrize("case", sorted(LOSS_CASES))
def test_the_compiled_loss_and_metrics_train_and_evaluate_as_keras_does(case):
    spec, head, loss, metrics = LOSS_CASES[case]
    _assert_same_training(lambda: _sequential(spec, head, loss, metrics), spec)


def test_regularization_losses_are_part_of_the_trained_and_reported_loss():
    spec, head, _, _ = LOSS_CASES["mse"]
    make = lambda: _sequential(spec, head, "mse", ["mae"],  # noqa: E731
                               regularizer=keras.regularizers.L2(0.5))
    _assert_same_training(make, spec)
    model = make()
    data = _data(spec)
    with_penalty = KerasTrainer(model, spec).evaluate(data)[0]
    plain = float(np.mean((model.predict(data.x, verbose=0)[:, 0] - data.y) ** 2))
    assert with_penalty > plain + 1e-3


@pytest.mark.parametrize("optimizer", [
    lambda: keras.optimizers.Adam(0.003, beta_1=0.8),
    lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    lambda: keras.optimizers.RMSprop(0.002),
])
def test_the_compiled_optimizer_class_and_hyperparameters_train(optimizer):
    spec, head, loss, metrics = LOSS_CASES["sparse-logits"]
    _assert_same_training(lambda: _sequential(spec, head, loss, metrics, optimizer()), spec)


def test_the_optimizer_starts_fresh_on_every_fit():
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = _sequential(SPEC, lambda: [keras.layers.Dense(3)], loss,
                        optimizer=keras.optimizers.Adam(0.01))
    trainer = KerasTrainer(model, SPEC)
    start, data = trainer.get_weights(), _data(SPEC)
    first = trainer.fit(data, epochs=2, batch_size=8, seed=3)
    after_first = trainer.get_weights()
    trainer.set_weights(start)
    second = trainer.fit(data, epochs=2, batch_size=8, seed=3)
    assert first.loss == second.loss and first.metrics == second.metrics
    for a, b in zip(after_first, trainer.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_stateful_metrics_are_reset_on_every_call():
    spec, head, loss, metrics = LOSS_CASES["binary-probabilities"]
    trainer = KerasTrainer(_sequential(spec, head, loss, metrics), spec)
    a, b = _data(spec, seed=1), _data(spec, seed=2)
    alone = trainer.evaluate(b)[1]
    trainer.evaluate(a)
    assert trainer.evaluate(b)[1] == alone


def _save(model: keras.Model, path) -> str:
    model.save(path)
    return str(path)


def test_a_keras_file_trains_with_its_compiled_optimizer_loss_and_metrics(tmp_path):
    spec = REGRESSION
    compiled = _sequential(spec, lambda: [keras.layers.Dense(1)], keras.losses.Huber(),
                           ["mae", keras.metrics.RootMeanSquaredError(name="rmse")],
                           keras.optimizers.Adam(0.0042))
    path = _save(compiled, tmp_path / "user.keras")
    trainer = cached_trainer(path, spec, "", 0.0, 0)
    assert type(trainer.optimizer) is keras.optimizers.Adam
    assert float(trainer.optimizer.learning_rate) == pytest.approx(0.0042)
    assert loss_name(trainer.model) == "huber_loss"
    result = trainer.fit(_data(spec), epochs=1, batch_size=8)
    assert set(result.metrics) == {"mae", "rmse"}
    _assert_same_training(lambda: build_model(path, spec, 0), spec)


def test_a_module_function_model_is_used_unchanged(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(textwrap.dedent("""
        import keras

        def build(spec):
            model = keras.Sequential([keras.Input(spec.input_shape), keras.layers.Dense(5),
                                      keras.layers.Dense(spec.num_classes)])
            model.compile(optimizer=keras.optimizers.Adagrad(0.07),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=[keras.metrics.SparseTopKCategoricalAccuracy(k=2, name="top2")])
            return model

        def without_spec():
            model = keras.Sequential([keras.layers.Dense(10, activation="relu"),
                                      keras.layers.Dense(1)])
            model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
            return model
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    trainer = cached_trainer("user_models:build", SPEC, "", 0.0, 0)
    assert type(trainer.optimizer) is keras.optimizers.Adagrad
    assert float(trainer.optimizer.learning_rate) == pytest.approx(0.07)
    assert trainer.metric_names() == ["top2"]
    _assert_same_training(lambda: build_model("user_models:build", SPEC, 0), SPEC)
    # An unbuilt Sequential that takes no spec: built on the data's inputs.
    model = build_model("user_models:without_spec", REGRESSION, 0)
    assert model.built and loss_name(model) == "mean_squared_error"


def test_explicit_optimizer_and_learning_rate_keys_replace_the_compiled_ones():
    model = _sequential(SPEC, lambda: [keras.layers.Dense(3)], "sparse_categorical_crossentropy",
                        optimizer=keras.optimizers.Adam(0.003, beta_1=0.7))
    kept = fresh_optimizer(model)
    assert type(kept) is keras.optimizers.Adam and kept.beta_1 == 0.7
    assert kept is not model.optimizer  # a fresh copy: a loaded file's state is not reused
    rate_only = fresh_optimizer(model, learning_rate=0.5)
    assert type(rate_only) is keras.optimizers.Adam and rate_only.beta_1 == 0.7
    assert float(rate_only.learning_rate) == pytest.approx(0.5)
    replaced = fresh_optimizer(model, "sgd", 0.25)
    assert type(replaced) is keras.optimizers.SGD
    assert float(replaced.learning_rate) == pytest.approx(0.25)


@pytest.mark.parametrize("spec, loss, units", [
    (DIGITS_SPEC, "sparse_categorical_crossentropy", 10),
    (BREAST_CANCER_SPEC, "binary_crossentropy", 1),
    (MULTILABEL_SPEC, "binary_crossentropy", 5),
    (DIABETES_SPEC, "mean_squared_error", 1),
])
def test_builders_are_compiled_with_a_default_for_the_task(spec, loss, units):
    model = build_model("mlp", spec, 0)
    assert loss_name(model) == loss
    assert model.output_shape[-1] == units


@pytest.mark.parametrize("name", ["functional_classifier", "subclassed_classifier"])
def test_functional_and_subclassed_example_models_train_as_keras_does(name):
    reference = f"examples.keras_models:{name}"
    # Dropout draws differ between our loop and Keras', so compare in a model without it.
    if name == "functional_classifier":
        trainer = cached_trainer(reference, DIGITS_SPEC, "", 0.0, 0)
        assert trainer.metric_names() == ["accuracy", "top3"]
        result = trainer.fit(_data(DIGITS_SPEC, 40), epochs=2, batch_size=8)
        assert set(result.metrics) == {"accuracy", "top3"}
        return
    _assert_same_training(lambda: build_model(reference, DIGITS_SPEC, 0), DIGITS_SPEC)


def test_nested_binary_example_trains_as_keras_does():
    _assert_same_training(lambda: build_model("examples.keras_models:nested_binary",
                                              BREAST_CANCER_SPEC, 0), BREAST_CANCER_SPEC)


def test_batchnorm_moving_statistics_travel_with_the_weights():
    """Non-trainable state (BatchNormalization's moving mean and variance) is part of the
    parameters a client returns, so the server averages it with the rest."""
    trainer = cached_trainer("examples.keras_models:functional_classifier", DIGITS_SPEC, "", 0.0, 0)
    names = [v.path for v in trainer.model.weights]
    moving = [i for i, n in enumerate(names) if "moving_mean" in n or "moving_variance" in n]
    assert len(moving) == 2 and len(trainer.get_weights()) == len(names)
    before = [trainer.get_weights()[i].copy() for i in moving]
    trainer.fit(_data(DIGITS_SPEC, 40), epochs=1, batch_size=8)
    after = [trainer.get_weights()[i] for i in moving]
    assert all(not np.allclose(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("name, spec, message", [
    ("examples.keras_models:regression", DIGITS_SPEC,
     "outputs 1 value(s) per example but the dataset is a 10-class classification"),
    ("mlp", DataSpec((7,), 0, task="regression", num_targets=2), None),
    ("examples.keras_models:nope", DIGITS_SPEC,
     "module examples.keras_models has no function 'nope'"),
    ("examples.keras_models:regresion", DIGITS_SPEC,
     "has no function 'regresion'; did you mean 'regression'?"),
    ("no_such_module:build", DIGITS_SPEC, "cannot import no_such_module:build"),
])
def test_models_that_do_not_fit_the_data_are_refused_with_the_model_named(name, spec, message):
    if message is None:  # a builder sizes its head from the spec: two regression targets fit
        assert build_model(name, spec, 0).output_shape[-1] == 2
        return
    with pytest.raises(ModelError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_model(name, spec, 0)


def test_uncompiled_models_and_bad_files_are_refused(tmp_path):
    path = tmp_path / "raw.keras"
    keras.Sequential([keras.Input((6,)), keras.layers.Dense(3)]).save(path)
    with pytest.raises(ModelError, match="is not compiled: call model.compile"):
        build_model(str(path), SPEC, 0)
    (tmp_path / "broken.keras").write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="cannot load"):
        build_model(str(tmp_path / "broken.keras"), SPEC, 0)
    with pytest.raises(ModelError, match="does not exist"):
        build_model(str(tmp_path / "missing.keras"), SPEC, 0)
    wide = _sequential(DataSpec((9,), 3), lambda: [keras.layers.Dense(3)], "mse")
    with pytest.raises(ModelError, match=r"expects inputs \(9,\) but the dataset has \(6,\)"):
        build_model(_save(wide, tmp_path / "wide.keras"), SPEC, 0)


def test_a_loss_that_cannot_take_the_targets_fails_before_training():
    model = _sequential(MULTILABEL, lambda: [keras.layers.Dense(4)],
                        keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    with pytest.raises(ModelError, match="cannot take the targets of a 4-label classification"):
        KerasTrainer(model, MULTILABEL)


def test_mixed_precision_models_scale_the_loss_as_keras_does():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        spec, head, loss, metrics = LOSS_CASES["sparse-logits"]
        _assert_same_training(lambda: _sequential(spec, head, loss, metrics), spec)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_an_optimizer_ema_is_applied_at_the_end_of_fit_as_model_fit_does():
    spec, head, loss, metrics = LOSS_CASES["sparse-logits"]
    make = lambda: _sequential(spec, head, loss, metrics,  # noqa: E731
                               keras.optimizers.SGD(0.5, use_ema=True, ema_momentum=0.5))
    data = _data(spec)
    trainer = KerasTrainer(make(), spec)
    trainer.fit(data, epochs=3, batch_size=len(data))
    reference = make()
    reference.fit(data.x, data.y, epochs=3, batch_size=len(data), shuffle=False, verbose=0)
    for a, b in zip(trainer.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_a_learning_rate_key_replaces_a_compiled_schedule_which_is_otherwise_kept():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=1, decay_rate=0.5)
    model = _sequential(SPEC, lambda: [keras.layers.Dense(3)], "sparse_categorical_crossentropy",
                        optimizer=keras.optimizers.SGD(schedule))
    kept = KerasTrainer(model, SPEC)
    kept.fit(_data(SPEC), epochs=1, batch_size=8, learning_rate=0.3)  # a schedule stays
    assert isinstance(kept.optimizer.get_config()["learning_rate"], dict)
    replaced = fresh_optimizer(model, learning_rate=0.05)
    assert float(replaced.learning_rate) == pytest.approx(0.05)


def test_a_keras_file_rewritten_on_disk_is_loaded_again(tmp_path):
    path = tmp_path / "m.keras"
    _save(_sequential(SPEC, lambda: [keras.layers.Dense(3)], "sparse_categorical_crossentropy",
                      optimizer=keras.optimizers.SGD(0.1)), path)
    cfg = make_config(model=str(path))
    first = trainer_for(TrainSettings.from_config(cfg), SPEC)
    assert trainer_for(TrainSettings.from_config(cfg), SPEC) is first
    _save(_sequential(SPEC, lambda: [keras.layers.Dense(3)], "sparse_categorical_crossentropy",
                      optimizer=keras.optimizers.Adam(0.001)), path)
    train = TrainSettings.from_config(cfg)
    assert type(trainer_for(train, SPEC).optimizer) is keras.optimizers.Adam


@pytest.mark.parametrize("outputs, loss, message", [
    (lambda x: [keras.layers.Dense(3)(x), keras.layers.Dense(1)(x)], "mse",
     "has 2 outputs .* single-output models"),
    (lambda x: keras.layers.Dense(1, activation="sigmoid")(x), "categorical_crossentropy",
     "takes one-hot classes, but it outputs 1 value"),
])
def test_models_the_fast_path_cannot_train_are_refused(outputs, loss, message):
    inputs = keras.Input((6,))
    model = keras.Model(inputs, outputs(inputs))
    model.compile(optimizer="sgd", loss=loss)
    with pytest.raises(ModelError, match=message):
        check_fits(model, BINARY, "model 'm'")
