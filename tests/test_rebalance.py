"""Client-side rebalancing (`rebalance`): Keras class weights through the compiled trainer,
oversampling and augmentation of minority classes, the key's checks, and the per-class
recall a run reports."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sklearn.metrics import recall_score
from sklearn.utils.class_weight import compute_class_weight

from fl_app.app.local_client import client_with
from fl_app.cli import simulate
from fl_app.data.rebalance import MASK_RATE, class_weights, rebalance, sample_weights
from fl_app.data.sources import ClientData
from fl_app.data.types import DataSpec, Split
from fl_app.ml.trainer import KerasTrainer
from tests.conftest import make_config

SPEC = DataSpec((4,), 3)


def _skewed(counts: tuple[int, ...] = (90, 10), width: int = 4, seed: int = 0) -> Split:
    """Features drawn per class (class c around c), labels in blocks of `counts`."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(counts)), counts).astype(np.int32)
    x = (rng.normal(size=(len(y), width)) + y[:, None]).astype(np.float32)
    return Split(x, y)


def _model(seed: int = 3) -> keras.Model:
    """A small softmax classifier compiled as a user would (SGD, sparse cross-entropy)."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def test_class_weights_are_keras_balanced_weights_over_the_classes_present():
    y = _skewed((90, 10)).y
    assert class_weights(y) == pytest.approx({0: 100 / (2 * 90), 1: 100 / (2 * 10)})
    balanced = compute_class_weight("balanced", classes=np.array([0, 1]), y=y)
    assert list(class_weights(y).values()) == pytest.approx(list(balanced))
    assert sample_weights(y).tolist() == pytest.approx([100 / 180] * 90 + [5.0] * 10)
    assert sample_weights(np.zeros(7, np.int32)).tolist() == [1.0] * 7  # one class: unweighted


def test_a_class_weighted_step_of_the_trainer_is_keras_fit_with_class_weight():
    data = _skewed((90, 10))
    ours, theirs = _model(), _model()
    theirs.set_weights(ours.get_weights())
    start = ours.get_weights()
    trainer = KerasTrainer(ours, SPEC)

    plain = trainer.fit(data, epochs=1, batch_size=len(data))
    unweighted = trainer.get_weights()
    trainer.set_weights(start)
    weighted = trainer.fit(data, epochs=1, batch_size=len(data),
                           sample_weight=sample_weights(data.y))
    fit = theirs.fit(data.x, data.y, batch_size=len(data), epochs=1, shuffle=False, verbose=0,
                     class_weight=class_weights(data.y))

    for ours_w, keras_w in zip(trainer.get_weights(), theirs.get_weights()):
        np.testing.assert_allclose(ours_w, keras_w, rtol=1e-5, atol=1e-6)
    assert weighted.loss == pytest.approx(fit.history["loss"][0], rel=1e-5)
    assert weighted.metrics["accuracy"] == pytest.approx(fit.history["accuracy"][0], rel=1e-5)
    # Switched off, the step is another one: the weights reached the loss and its gradient.
    assert plain.loss != pytest.approx(weighted.loss, rel=1e-3)
    assert max(np.abs(a - b).max() for a, b in zip(unweighted, trainer.get_weights())) > 1e-3


def test_oversampling_equalises_the_class_counts_with_copies_of_minority_examples():
    data = _skewed((50, 10, 3))
    balanced, weights = rebalance(data, "oversample", [1, 2, 3])
    assert weights is None
    assert np.bincount(balanced.y).tolist() == [50, 50, 50]
    np.testing.assert_array_equal(balanced.x[:len(data)], data.x)  # the originals first
    extra_x, extra_y = balanced.x[len(data):], balanced.y[len(data):]
    assert set(extra_y.tolist()) == {1, 2}
    for x, y in zip(extra_x, extra_y):  # each extra is one of its own class's examples
        assert (data.x[data.y == y] == x).all(axis=1).any()
    again, _ = rebalance(data, "oversample", [1, 2, 3])
    other_round, _ = rebalance(data, "oversample", [1, 3, 3])
    np.testing.assert_array_equal(again.x, balanced.x)
    assert not np.array_equal(other_round.x, balanced.x)


def test_augmentation_adds_only_new_masked_minority_examples_seeded():
    data = _skewed((400, 100), width=64)
    augmented, weights = rebalance(data, "augment", [1, 2, 3])
    assert weights is None
    assert np.bincount(augmented.y).tolist() == [400, 400]
    np.testing.assert_array_equal(augmented.x[:len(data)], data.x)
    extra_x, extra_y = augmented.x[len(data):], augmented.y[len(data):]
    assert set(extra_y.tolist()) == {1}
    copies = sum((data.x == x).all(axis=1).any() for x in extra_x)
    assert copies == 0  # mixed and masked, not copied
    assert np.mean(extra_x == 0) == pytest.approx(MASK_RATE, abs=0.01)
    minority = data.x[data.y == 1]  # a within-class mix stays inside the class's range
    assert (extra_x >= np.minimum(minority.min(axis=0), 0) - 1e-5).all()
    assert (extra_x <= np.maximum(minority.max(axis=0), 0) + 1e-5).all()
    again, _ = rebalance(data, "augment", [1, 2, 3])
    other_client, _ = rebalance(data, "augment", [1, 2, 4])
    np.testing.assert_array_equal(again.x, augmented.x)
    assert not np.array_equal(other_client.x, augmented.x)


@pytest.mark.parametrize("mode", ["oversample", "augment"])
def test_a_balanced_or_single_class_client_gets_no_extra_examples(mode):
    for counts in ((20, 20, 20), (30,)):
        data = _skewed(counts)
        same, _ = rebalance(data, mode, [0])
        np.testing.assert_array_equal(same.x, data.x)
        np.testing.assert_array_equal(same.y, data.y)


def test_the_key_reaches_the_clients_training():
    """A 90/10 client's update under `rebalance='class-weight'` differs from the unweighted
    one; under 'oversample' it trains on 180 examples; the example count it reports stays
    its own data's."""
    data = _skewed((90, 10), width=64)
    client_data = ClientData(data, Split(data.x[:0], data.y[:0]), "skewed")
    updates, steps = {}, {}
    for mode in ("none", "class-weight", "oversample"):
        cfg = make_config(rebalance=mode, local_epochs=1, batch_size=100)
        client = client_with(cfg, {"partition-id": 0}, client_data)
        weights, count, metrics = client.fit(client.get_parameters({}), {})
        assert count == len(data)
        updates[mode], steps[mode] = weights, metrics["local_steps"]
    assert max(np.abs(a - b).max() for a, b in zip(updates["none"], updates["class-weight"])) > 1e-4
    assert (steps["none"], steps["oversample"]) == (1, 2)  # batches of 100


def test_class_recall_is_scikit_learns_per_class_recall():
    data = _skewed((60, 30, 10))
    trainer = KerasTrainer(_model(), SPEC)
    trainer.fit(data, epochs=3, batch_size=16)
    predicted = trainer.model.predict(data.x, verbose=0).argmax(-1)
    expected = recall_score(data.y, predicted, average=None)
    assert trainer.class_recall(data) == pytest.approx({"0": expected[0], "1": expected[1],
                                                        "2": expected[2]})


def test_a_bad_value_or_a_task_without_classes_is_one_error_line(capsys):
    assert simulate.main(["--check", "--run-config", "rebalance='oversampel'"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run-config key 'rebalance' has invalid value 'oversampel'")
    assert err.endswith("did you mean 'oversample'?\n")
    assert simulate.main(["--check", "--run-config",
                          "dataset='diabetes' rebalance='class-weight' partitioner='iid'"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run-config key 'rebalance' is 'class-weight', but the data "
                          "is a regression") and err.count("\n") == 1
