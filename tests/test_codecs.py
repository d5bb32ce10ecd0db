"""The wire codecs alone: each round-trips within its stated error, int8's stochastic
rounding is unbiased, blobs have the stated sizes, and malformed blobs are refused."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from fl_app.codecs import (
    FP16_REL,
    FP16_SUBNORMAL_ABS,
    INT8_LEVELS,
    CodecError,
    Fp16Codec,
    Int8Codec,
    TopKCodec,
    codec_of,
    down_codec,
    up_codec,
)

SHAPES = ((16, 8), (8,), (3, 3, 2, 5), (1,))
FALSE_FAILURE_RATE = 1e-6  # of the unbiasedness test, over all its elements together


def model(seed: int = 0, scale: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=s) * scale).astype(np.float32) for s in SHAPES]


def l2(arrays) -> float:
    return float(np.sqrt(sum(np.sum(np.square(a, dtype=np.float64)) for a in arrays)))


def scales_of(codec: Int8Codec, a: np.ndarray) -> np.ndarray:
    """The codec's scale for every element of `a` (broadcast back to its shape)."""
    channels = a.shape[-1] if codec.per_channel and a.ndim >= 2 else 1
    flat = np.abs(a.astype(np.float64)).reshape(-1, channels)
    return np.broadcast_to(flat.max(axis=0) / INT8_LEVELS, flat.shape).reshape(a.shape)


def test_fp16_round_trips_within_half_a_unit_in_the_last_place():
    x = model(scale=3.0) + [np.array([1e-6, -3e-7, 6e-5], np.float32)]  # subnormals too
    codec = Fp16Codec()
    blobs = codec.encode(x)
    y = codec.decode(blobs, x)
    for a, b, blob in zip(x, y, blobs):
        assert b.dtype == np.float32 and b.shape == a.shape and len(blob) == 2 * a.size
        assert np.all(np.abs(b - a) <= FP16_REL * np.abs(a) + FP16_SUBNORMAL_ABS)
    assert l2(y) - l2(x) <= codec.overshoot(blobs, x)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("stochastic", [True, False])
def test_int8_round_trips_within_one_step_or_half_a_step(per_channel, stochastic):
    x = model(seed=1)
    codec = Int8Codec(per_channel=per_channel, stochastic=stochastic)
    blobs = codec.encode(x, np.random.default_rng(0))
    y = codec.decode(blobs, x)
    step = 1.0 if stochastic else 0.5
    for a, b, blob in zip(x, y, blobs):
        channels = a.shape[-1] if per_channel and a.ndim >= 2 else 1
        assert len(blob) == a.size + 4 * channels  # int8 values, float32 scales
        s = scales_of(codec, a)
        assert np.all(np.abs(b.astype(np.float64) - a) <= step * s * (1 + 1e-6))
        assert np.max(np.abs(b)) <= np.max(np.abs(a)) * (1 + 1e-6)  # the range is kept
    assert l2(y) - l2(x) <= codec.overshoot(blobs, x)


def test_int8_per_channel_keeps_a_small_channel_precise():
    """One scale per output channel: a channel of tiny weights next to a large one keeps
    its precision, which one scale for the whole tensor loses."""
    x = [np.stack([np.linspace(-1e-3, 1e-3, 50), np.linspace(-10, 10, 50)], axis=1)
         .astype(np.float32)]
    err = {}
    for per_channel in (False, True):
        codec = Int8Codec(per_channel=per_channel, stochastic=False)
        err[per_channel] = float(np.max(np.abs(codec.decode(codec.encode(x), x)[0][:, 0]
                                               - x[0][:, 0])))
    assert err[True] <= 1e-3 / INT8_LEVELS / 2 * 1.001 < err[False]


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_stochastic_rounding_is_unbiased(per_channel):
    """z-test per element: the mean of n decodings against x, with the variance bound
    s²/4 of one decoding (a Bernoulli step of size s). The critical value is Bonferroni-
    corrected over all elements, so a correct codec fails with probability at most
    FALSE_FAILURE_RATE; the same test catches rounding to nearest, which is biased."""
    x = model(seed=2)
    n = 2000
    size = sum(a.size for a in x)
    critical = norm.isf(FALSE_FAILURE_RATE / (2 * size))
    codec = Int8Codec(per_channel=per_channel, stochastic=True)
    nearest = Int8Codec(per_channel=per_channel, stochastic=False)
    rng = np.random.default_rng(123)

    def worst_z(c: Int8Codec) -> float:
        total = [np.zeros(a.shape) for a in x]
        for _ in range(n):
            for t, d in zip(total, c.decode(c.encode(x, rng), x)):
                t += d
        return max(float(np.max(np.abs(t / n - a) / (scales_of(c, a) / 2 / np.sqrt(n))))
                   for t, a in zip(total, x))

    assert worst_z(codec) < critical
    assert worst_z(nearest) > critical  # the test has power against a biased rounding


def test_top_k_keeps_exactly_the_largest_entries_over_all_arrays():
    x = model(seed=3)
    flat = np.concatenate([a.ravel() for a in x])
    codec = TopKCodec(0.05)
    k = int(np.ceil(0.05 * flat.size))
    blobs = codec.encode(x)
    y = codec.decode(blobs, x)
    assert sum(len(b) for b in blobs) == 8 * k  # uint32 index + float32 value each
    kept = np.concatenate([b.ravel() for b in y]) != 0
    assert kept.sum() == k
    assert np.min(np.abs(flat[kept])) >= np.max(np.abs(flat[~kept]))
    for a, b in zip(x, y):  # exact where kept, zero elsewhere
        assert np.array_equal(b[b != 0], a[b != 0])
    assert l2(y) <= l2(x) and codec.overshoot(blobs, x) == 0


def test_top_k_sends_at_least_one_entry():
    x = [np.array([0.1, -3.0, 0.2], np.float32)]
    y = TopKCodec(0.01).decode(TopKCodec(0.01).encode(x), x)
    assert y[0].tolist() == [0.0, -3.0, 0.0]


@pytest.mark.parametrize("codec", [Fp16Codec(), Int8Codec(), Int8Codec(per_channel=True),
                                   TopKCodec(0.1)])
def test_blobs_that_do_not_fit_the_model_are_refused(codec):
    x = model(seed=4)
    blobs = codec.encode(x, np.random.default_rng(0))
    with pytest.raises(CodecError, match="expected 4"):
        codec.decode(blobs[:-1], x)
    with pytest.raises(CodecError, match="tensor 0"):
        codec.decode([blobs[0] + b"\x00" * 3, *blobs[1:]], x)


def test_a_top_k_index_beyond_the_array_is_refused():
    x = [np.zeros(4, np.float32)]
    blob = np.array([7], "<u4").tobytes() + np.array([1.0], "<f4").tobytes()
    with pytest.raises(CodecError, match="beyond its 4 entries"):
        TopKCodec().decode([blob], x)


def test_what_cannot_be_encoded_is_refused():
    with pytest.raises(CodecError, match="non-finite"):
        Int8Codec().encode([np.array([1.0, np.nan], np.float32)])
    with pytest.raises(CodecError, match="fp16's range"):
        Fp16Codec().encode([np.array([1e6], np.float32)])
    with pytest.raises(CodecError, match="floating-point"):
        TopKCodec().encode([np.array([1, 2], np.int64)])


def test_codecs_by_name_and_by_tensor_type():
    assert up_codec("none") is None and down_codec("none") is None
    assert isinstance(up_codec("top-k", 0.2), TopKCodec) and up_codec("top-k", 0.2).fraction == 0.2
    assert down_codec("int8").per_channel and not down_codec("int8").stochastic
    for name in ("fp16", "int8", "int8-channel", "top-k"):
        assert codec_of(up_codec(name).tensor_type).name == name
    assert codec_of("numpy.ndarray") is None
    with pytest.raises(CodecError, match="unknown codec"):
        codec_of("fl-codec/zip")
    with pytest.raises(CodecError, match="unknown update codec"):
        up_codec("int4")
