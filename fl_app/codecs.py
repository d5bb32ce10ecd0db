"""Wire codecs for model updates and broadcasts: fp16, int8 and top-k sparsification.

A codec turns a list of floating-point arrays into one bytes blob per array, the tensors
of a Flower `Parameters` whose `tensor_type` names the codec (`fl-codec/<name>`), and back,
given the arrays it stands for (their shapes; decoding is always to float32). Server and
client both use it, so it imports nothing of ours.

Blobs per array and the error of decode(encode(x)) per element:

- `fp16`: x as IEEE half floats (2 bytes each); error ≤ 2⁻¹¹·|x| (+2⁻²⁵ below fp16's
  normal range).
- `int8`: a float32 scale s = max|x|/127, then q = x/s rounded (1 byte each); error < s
  (stochastic rounding), ≤ s/2 (nearest).
- `int8-channel`: as int8 with one scale per output channel (the last axis; an array of one
  axis has one scale).
- `top-k`: uint32 flat indices and float32 values of the k largest |x| over all arrays
  together (8 bytes each), exact zeros left out (they decode to zero anyway, so a pruned
  model's update costs only its non-zero entries); exact where kept, the rest dropped.

Stochastic rounding (Suresh et al., 2017, "Distributed Mean Estimation with Limited
Communication") rounds x/s up with probability equal to its fractional part, so the decoded
value is an unbiased estimate of x; nearest rounding (`stochastic=False`, for the server's
broadcast) halves the error but is biased. Top-k (Aji & Heafield, 2017; Stich et al., 2018)
is biased; error feedback on the client (the residual carried into the next round) makes
up for it. `overshoot` bounds how much a decoded vector's L2 norm can exceed the input's,
which a clip norm must allow for.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
from numpy.typing import NDArray

TENSOR_TYPE_PREFIX = "fl-codec/"
FP16_MAX = float(np.finfo(np.float16).max)
FP16_REL = 2.0 ** -11  # half the spacing of fp16 relative to the value (unit roundoff)
FP16_SUBNORMAL_ABS = 2.0 ** -25  # half the spacing of fp16's subnormals
INT8_LEVELS = 127

Arrays = list[NDArray]


class CodecError(ValueError):
    """An array cannot be encoded, or a blob does not decode to the arrays it stands for."""


def _check_encodable(arrays: Arrays) -> None:
    for i, a in enumerate(arrays):
        if not np.issubdtype(np.asarray(a).dtype, np.floating):
            raise CodecError(f"array {i} has dtype {np.asarray(a).dtype}: codecs encode "
                             "floating-point arrays only")
        if not np.all(np.isfinite(a)):
            raise CodecError(f"array {i} holds a non-finite value: it cannot be encoded")


def _check_count(blobs: list[bytes], like: Arrays) -> None:
    if len(blobs) != len(like):
        raise CodecError(f"{len(blobs)} tensor(s), expected {len(like)} (one per model array)")


class Codec(ABC):
    """Encodes float arrays into one bytes blob each and decodes them back to float32."""

    name: str

    @property
    def tensor_type(self) -> str:
        """The `Parameters.tensor_type` that marks blobs of this codec."""
        return TENSOR_TYPE_PREFIX + self.name

    @abstractmethod
    def encode(self, arrays: Arrays, rng: np.random.Generator | None = None) -> list[bytes]:
        """One blob per array (`rng` draws the stochastic rounding, if any). Raises
        CodecError for a non-float or non-finite array."""

    @abstractmethod
    def decode(self, blobs: list[bytes], like: Arrays) -> Arrays:
        """The float32 arrays, shaped like `like`. Raises CodecError for a blob that does not
        fit its array (wrong count or length, an index out of range)."""

    def overshoot(self, blobs: list[bytes], like: Arrays) -> float:
        """An upper bound on ||decode(blobs)|| − ||x|| (L2 over all arrays) for the x that
        was encoded: the L2 norm of the largest possible decoding error."""
        return 0.0


class Fp16Codec(Codec):
    """IEEE half precision, rounded to nearest (values beyond ±65504 are refused)."""

    name = "fp16"

    def encode(self, arrays: Arrays, rng: np.random.Generator | None = None) -> list[bytes]:
        _check_encodable(arrays)
        for i, a in enumerate(arrays):
            if a.size and float(np.max(np.abs(a))) > FP16_MAX:
                raise CodecError(f"array {i} holds a value beyond fp16's range (±{FP16_MAX:g})")
        return [np.asarray(a, dtype="<f2").tobytes() for a in arrays]

    def decode(self, blobs: list[bytes], like: Arrays) -> Arrays:
        _check_count(blobs, like)
        out = []
        for i, (blob, ref) in enumerate(zip(blobs, like)):
            if len(blob) != 2 * ref.size:
                raise CodecError(f"tensor {i} has {len(blob)} bytes, fp16 of shape "
                                 f"{ref.shape} needs {2 * ref.size}")
            out.append(np.frombuffer(blob, dtype="<f2").astype(np.float32).reshape(ref.shape))
        return out

    def overshoot(self, blobs: list[bytes], like: Arrays) -> float:
        decoded = self.decode(blobs, like)
        # |x - x̂| ≤ u·|x| ≤ u·|x̂|/(1-u), plus half a subnormal step near zero.
        bound = sum(float(np.sum(np.square(
            np.abs(d.astype(np.float64)) * FP16_REL / (1 - FP16_REL) + FP16_SUBNORMAL_ABS)))
            for d in decoded)
        return math.sqrt(bound)


class Int8Codec(Codec):
    """8-bit integers times a float32 scale per array or per output channel (last axis).

    Args:
        per_channel: one scale per slice of the last axis for arrays of two or more axes
            (Keras kernels: per output unit or filter); one per array otherwise.
        stochastic: unbiased stochastic rounding (else rounding to nearest).
    """

    def __init__(self, per_channel: bool = False, stochastic: bool = True) -> None:
        self.per_channel = per_channel
        self.stochastic = stochastic
        self.name = "int8-channel" if per_channel else "int8"

    def _channels(self, shape: tuple[int, ...]) -> int:
        return shape[-1] if self.per_channel and len(shape) >= 2 else 1

    def _scales(self, a: NDArray) -> NDArray:
        flat = np.abs(np.asarray(a, dtype=np.float64)).reshape(-1, self._channels(a.shape))
        return (flat.max(axis=0) if flat.size else np.zeros(flat.shape[1])) / INT8_LEVELS

    def encode(self, arrays: Arrays, rng: np.random.Generator | None = None) -> list[bytes]:
        _check_encodable(arrays)
        rng = rng if rng is not None else np.random.default_rng()
        blobs = []
        for a in arrays:
            scales = self._scales(a).astype(np.float32)
            x = np.asarray(a, dtype=np.float64).reshape(-1, scales.size)
            scaled = x / np.where(scales > 0, scales, 1.0).astype(np.float64)
            q = (np.floor(scaled + rng.random(scaled.shape)) if self.stochastic
                 else np.rint(scaled))
            q = np.clip(q, -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
            blobs.append(scales.astype("<f4").tobytes() + q.tobytes())
        return blobs

    def _split(self, blob: bytes, ref: NDArray, i: int) -> tuple[NDArray, NDArray]:
        channels = self._channels(ref.shape)
        if len(blob) != 4 * channels + ref.size:
            raise CodecError(f"tensor {i} has {len(blob)} bytes, {self.name} of shape "
                             f"{ref.shape} needs {4 * channels + ref.size}")
        scales = np.frombuffer(blob[:4 * channels], dtype="<f4").astype(np.float32)
        q = np.frombuffer(blob[4 * channels:], dtype=np.int8).reshape(-1, channels)
        return scales, q

    def decode(self, blobs: list[bytes], like: Arrays) -> Arrays:
        _check_count(blobs, like)
        out = []
        for i, (blob, ref) in enumerate(zip(blobs, like)):
            scales, q = self._split(blob, ref, i)
            out.append((q.astype(np.float32) * scales).reshape(ref.shape))
        return out

    def overshoot(self, blobs: list[bytes], like: Arrays) -> float:
        _check_count(blobs, like)
        step = 1.0 if self.stochastic else 0.5  # error < s (stochastic), ≤ s/2 (nearest)
        total = 0.0
        for i, (blob, ref) in enumerate(zip(blobs, like)):
            scales, q = self._split(blob, ref, i)
            total += q.shape[0] * float(np.sum(np.square(scales.astype(np.float64) * step)))
        return math.sqrt(total)


class TopKCodec(Codec):
    """The `fraction` of entries with the largest magnitude over all arrays together (at
    least one), as uint32 flat indices and float32 values per array, less those that are
    exactly zero (with `fraction` 1, every non-zero entry: a lossless sparse encoding);
    the rest decode to zero."""

    name = "top-k"

    def __init__(self, fraction: float = 0.01) -> None:
        if not 0 < fraction <= 1:
            raise CodecError(f"the top-k fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction

    def encode(self, arrays: Arrays, rng: np.random.Generator | None = None) -> list[bytes]:
        _check_encodable(arrays)
        flat = [np.asarray(a, dtype=np.float32).ravel() for a in arrays]
        everything = np.concatenate(flat) if flat else np.zeros(0, np.float32)
        k = min(everything.size, max(1, math.ceil(self.fraction * everything.size)))
        keep = np.zeros(everything.size, dtype=bool)
        if k:
            keep[np.argpartition(np.abs(everything), everything.size - k)[-k:]] = True
            keep &= everything != 0
        blobs, start = [], 0
        for a in flat:
            idx = np.flatnonzero(keep[start:start + a.size]).astype("<u4")
            blobs.append(idx.tobytes() + a[idx].astype("<f4").tobytes())
            start += a.size
        return blobs

    def decode(self, blobs: list[bytes], like: Arrays) -> Arrays:
        _check_count(blobs, like)
        out = []
        for i, (blob, ref) in enumerate(zip(blobs, like)):
            if len(blob) % 8:
                raise CodecError(f"tensor {i} has {len(blob)} bytes, not a whole number of "
                                 "(uint32 index, float32 value) pairs")
            n = len(blob) // 8
            idx = np.frombuffer(blob[:4 * n], dtype="<u4")
            if n > ref.size or (n and int(idx.max()) >= ref.size):
                raise CodecError(f"tensor {i} names an entry beyond its {ref.size} entries")
            dense = np.zeros(ref.size, dtype=np.float32)
            dense[idx] = np.frombuffer(blob[4 * n:], dtype="<f4")
            out.append(dense.reshape(ref.shape))
        return out


UP_CODECS = ("none", "fp16", "int8", "int8-channel", "top-k")
DOWN_CODECS = ("none", "fp16", "int8")


def up_codec(name: str, top_k: float = 0.01) -> Codec | None:
    """The client → server codec `name` (None for "none"); int8 rounds stochastically."""
    if name not in UP_CODECS:
        raise CodecError(f"unknown update codec '{name}' (choose from {', '.join(UP_CODECS)})")
    return {"none": None, "fp16": Fp16Codec(), "int8": Int8Codec(),
            "int8-channel": Int8Codec(per_channel=True), "top-k": TopKCodec(top_k)}[name]


def down_codec(name: str) -> Codec | None:
    """The server → client codec `name` (None for "none"): fp16, or int8 per output channel
    rounded to nearest (the broadcast needs no unbiasedness, and nearest halves the error)."""
    if name not in DOWN_CODECS:
        raise CodecError(f"unknown broadcast codec '{name}' (choose from "
                         f"{', '.join(DOWN_CODECS)})")
    return {"none": None, "fp16": Fp16Codec(),
            "int8": Int8Codec(per_channel=True, stochastic=False)}[name]


def codec_of(tensor_type: str) -> Codec | None:
    """The codec that decodes tensors of `tensor_type`, or None for plain (uncompressed)
    tensors. Raises CodecError for an `fl-codec/` type no codec has."""
    if not tensor_type.startswith(TENSOR_TYPE_PREFIX):
        return None
    name = tensor_type.removeprefix(TENSOR_TYPE_PREFIX)
    decoders = {"fp16": Fp16Codec(), "int8": Int8Codec(), "int8-channel":
                Int8Codec(per_channel=True), "top-k": TopKCodec()}
    if name not in decoders:
        raise CodecError(f"unknown codec in tensor type '{tensor_type}'")
    return decoders[name]
