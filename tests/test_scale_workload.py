"""The realistic workload: `cnn-1m` and `cnn-10m` on generated CIFAR-shaped images (or any
image file), sized as their names say, and learnable."""

from __future__ import annotations

import numpy as np
import pytest

from fl_app.data.sources import IMAGES_SPEC, data_source, data_spec, load_partition
from fl_app.data.types import DataSettings
from fl_app.ml.models import build_model
from tests.conftest import make_config


@pytest.mark.parametrize(("name", "size"), [("cnn-1m", 1_000_000), ("cnn-10m", 10_000_000)])
def test_parameter_counts_are_as_named(name, size):
    model = build_model(name, IMAGES_SPEC, seed=0)
    assert 0.8 * size <= model.count_params() <= 1.2 * size
    assert tuple(model.input_shape[1:]) == (32, 32, 3)


def _images(seed: int, samples: int = 400, noise: float = 0.5):
    cfg = make_config(dataset="synthetic-images", seed=seed, synthetic_images_samples=samples,
                      synthetic_images_noise=noise)
    return cfg, data_source(DataSettings.from_config(cfg))


def test_generated_images_are_deterministic_per_seed():
    _, first = _images(1)
    _, again = _images(1)
    _, other = _images(2)
    assert first.spec == IMAGES_SPEC
    a, b, c = first.test_set(), again.test_set(), other.test_set()
    assert a.x.shape[1:] == (32, 32, 3) and a.x.dtype == np.float32
    assert 0.0 <= a.x.min() and a.x.max() <= 1.0
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.x, c.x)


def test_generated_images_are_class_conditional():
    """The class means of one half classify the other half far above chance (10%)."""
    cfg, source = _images(3, samples=2000)
    train = load_partition(DataSettings.from_config(cfg), 0, 1).train
    test = source.test_set()
    means = np.stack([train.x[train.y == k].mean(axis=0) for k in range(10)])
    distances = ((test.x[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))
    accuracy = float(np.mean(distances.argmin(axis=1) == test.y))
    assert accuracy > 0.3


def test_a_few_local_steps_of_cnn_1m_reduce_the_loss():
    _, source = _images(4, samples=300)
    data = source.test_set()  # 60 images: the model has not seen them
    model = build_model("cnn-1m", source.spec, seed=0)
    before = model.evaluate(data.x, data.y, verbose=0)[0]
    model.fit(data.x, data.y, epochs=3, batch_size=20, verbose=0)
    after = model.evaluate(data.x, data.y, verbose=0)[0]
    assert after < before


def test_the_cnns_take_any_image_file(tmp_path):
    rng = np.random.default_rng(5)
    path = tmp_path / "images.npz"
    np.savez(path, x=rng.random((60, 32, 32, 3), dtype=np.float32),
             y=np.arange(60) % 4)
    cfg = make_config(dataset=str(path))
    spec = data_spec(DataSettings.from_config(cfg))
    assert spec.input_shape == (32, 32, 3) and spec.num_classes == 4
    model = build_model("cnn-1m", spec, seed=0)
    assert tuple(model.input_shape[1:]) == (32, 32, 3) and model.output_shape[-1] == 4


@pytest.mark.parametrize("name", ["cnn-1m", "cnn-10m"])
def test_the_benchmark_uses_the_models_own_layer_shapes(name):
    from scripts.bench.aggregation_scale import MODELS, vgg_shapes

    model = build_model(name, IMAGES_SPEC, seed=0)
    assert vgg_shapes(*MODELS[name]) == [tuple(w.shape) for w in model.get_weights()]
