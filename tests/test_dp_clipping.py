"""L2 clipping of updates (fl_app.protocol.clipping) and client-side clipping in KerasClient."""

from __future__ import annotations

import numpy as np
import pytest

from fl_app.app.local_client import client_for
from fl_app.data.sources import data_source
from fl_app.data.types import DataSettings
from fl_app.ml.trainer import TrainSettings, trainer_for
from fl_app.protocol.clipping import (
    clip_update,
    clip_weights,
    l2_norm,
    model_update,
)
from fl_app.wire import KEY_CLIPPING_NORM, KEY_NORM_BIT, round_config
from tests.conftest import make_config
from tests.flower_objects import random_model


def test_l2_norm_is_the_norm_of_all_layers_flattened_together():
    rng = np.random.default_rng(0)
    arrays = random_model(rng)
    flat = np.concatenate([a.ravel().astype(np.float64) for a in arrays])
    assert l2_norm(arrays) == pytest.approx(float(np.linalg.norm(flat)), rel=1e-12)


@pytest.mark.parametrize("clip_norm", [0.01, 0.5, 3.0])
def test_clipped_update_norm_is_at_most_c_and_direction_is_kept(clip_norm):
    rng = np.random.default_rng(1)
    for _ in range(50):
        update = [a * rng.uniform(0.1, 10) for a in random_model(rng)]
        clipped, norm = clip_update(update, clip_norm)
        assert norm == pytest.approx(l2_norm(update))
        assert l2_norm(clipped) <= clip_norm + 1e-6
        scale = min(1.0, clip_norm / norm)  # one factor for every layer
        for c, u in zip(clipped, update):
            np.testing.assert_allclose(c, u.astype(np.float64) * scale, rtol=1e-12)


def test_update_under_c_passes_unchanged():
    rng = np.random.default_rng(2)
    update = random_model(rng)
    clipped, norm = clip_update(update, l2_norm(update) * 1.01)
    for c, u in zip(clipped, update):
        np.testing.assert_array_equal(c, u.astype(np.float64))


def test_clip_weights_clips_the_difference_to_the_reference_and_keeps_dtypes():
    rng = np.random.default_rng(3)
    reference, weights = random_model(rng), random_model(rng)
    out, was_clipped = clip_weights(weights, reference, 0.5)
    assert was_clipped
    assert [a.dtype for a in out] == [a.dtype for a in reference]
    assert l2_norm(model_update(out, reference)) == pytest.approx(0.5, rel=1e-5)
    same, was_clipped = clip_weights(weights, reference, 1e6)
    assert not was_clipped
    for a, w in zip(same, weights):
        np.testing.assert_array_equal(a, w)


def test_clip_norm_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        clip_update([np.ones(3)], 0.0)


@pytest.fixture(scope="module")
def client_and_weights():
    cfg = make_config(local_epochs=1)
    client = client_for(cfg, {"partition-id": 0, "num-partitions": 10})
    settings = DataSettings.from_config(cfg)
    train = TrainSettings.from_config(cfg)
    weights = [w.copy() for w in trainer_for(train, data_source(settings).spec).get_weights()]
    return cfg, client, weights


def test_keras_client_clips_its_update_when_the_config_carries_a_clip_norm(client_and_weights):
    cfg, client, weights = client_and_weights
    unclipped, _, metrics = client.fit(weights, round_config(cfg, 1))
    assert KEY_NORM_BIT not in metrics
    free_norm = l2_norm(model_update(unclipped, weights))
    clip_norm = free_norm / 4
    sent, _, metrics = client.fit(weights, {**round_config(cfg, 1), KEY_CLIPPING_NORM: clip_norm})
    assert metrics[KEY_NORM_BIT] is True
    # what the server receives: float32 weights; their update is within C up to float32 rounding
    assert l2_norm(model_update(sent, weights)) <= clip_norm * (1 + 1e-6)
    for update, free in zip(model_update(sent, weights), model_update(unclipped, weights)):
        np.testing.assert_allclose(update, free / 4, atol=1e-6)  # scaled, not truncated


def test_keras_client_leaves_an_update_under_the_clip_norm_unchanged(client_and_weights):
    cfg, client, weights = client_and_weights
    unclipped, _, _ = client.fit(weights, round_config(cfg, 1))
    big = 10 * l2_norm(model_update(unclipped, weights))
    sent, _, metrics = client.fit(weights, {**round_config(cfg, 1), KEY_CLIPPING_NORM: big})
    assert metrics[KEY_NORM_BIT] is False
    for s, u in zip(sent, unclipped):
        np.testing.assert_array_equal(s, u)
