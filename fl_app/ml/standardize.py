"""Federated standardization, the Keras way (`standardize=true`).

Every client sends the sums of its training data (`moments`: the count, sum and sum of
squares of each feature along the last axis, and of a regression target); the server adds
them and `from_moments` turns the pooled sums into a `Standardization`: the mean and
variance of a `keras.layers.Normalization` in front of the model and, for a regression,
the target's mean and standard deviation, which a `keras.layers.Rescaling` after the
output undoes. Clients train on inputs passed through that same Normalization layer and on
standardized targets; evaluation reports the loss and metrics on the raw target scale;
`wrap` makes the model that `final_model.keras` holds: raw inputs in, raw-scale outputs out.
The sums are plain sums of float64 values, so the pooled statistics equal the central ones
(to float64 rounding), whatever the partition.
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import keras
import numpy as np

from fl_app.data.types import DataSpec

UNSCALED = (np.ones(1, np.float32), np.zeros(1, np.float32))  # (scale, offset) of no target scale


def moments(x: np.ndarray, y: np.ndarray | None) -> list[np.ndarray]:
    """A client's sums, as float64 arrays: the counts (values per feature along the last
    axis, and rows), the features' sums and sums of squares, then the target's (empty
    without `y`)."""
    features = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    targets = (np.zeros((0, 0)) if y is None
               else np.asarray(y, np.float64).reshape(len(y), -1))
    return [np.array([len(features), len(x)], np.float64), features.sum(axis=0),
            np.square(features).sum(axis=0), targets.sum(axis=0), np.square(targets).sum(axis=0)]


def mean_variance(count: float, total: np.ndarray,
                  squares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) variance from sums, as they are (about 0 for a constant)."""
    mean = total / count
    return mean, np.maximum(squares / count - np.square(mean), 0.0)


def _mean_variance(count: float, total: np.ndarray,
                   squares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`mean_variance`, where a constant column gets variance 1, so the Normalization layer
    leaves it centred instead of dividing by ~0. Constant means a variance within float64
    rounding of zero (E[x²] - E[x]² cancels to about 1e-16 of E[x²], never exactly 0 for
    most constants)."""
    mean, variance = mean_variance(count, total, squares)
    rounding = 1e-12 * np.maximum(np.square(mean), 1.0)
    return mean, np.where(variance > rounding, variance, 1.0)


@dataclass(frozen=True)
class Standardization:
    """Per-feature mean and variance of the inputs (last axis) and, for a regression, the
    target's mean and standard deviation (None for classes)."""

    x_mean: np.ndarray
    x_variance: np.ndarray
    y_mean: np.ndarray | None = None
    y_std: np.ndarray | None = None

    def normalization(self) -> keras.layers.Normalization:
        """A new Keras layer that standardizes the inputs (one per model that holds it)."""
        return keras.layers.Normalization(axis=-1, mean=self.x_mean, variance=self.x_variance)

    @cached_property
    def _layer(self) -> keras.layers.Normalization:
        """The layer `inputs` applies, built once per statistics."""
        return self.normalization()

    def inputs(self, x: np.ndarray) -> np.ndarray:
        """`x` through the Normalization layer (float32), as the final model sees it."""
        return np.asarray(self._layer(np.asarray(x, np.float32)), np.float32)

    def targets(self, y: np.ndarray) -> np.ndarray:
        """A regression target standardized (float32); class labels unchanged."""
        if self.y_mean is None:
            return y
        scaled = (np.asarray(y, np.float64).reshape(len(y), -1) - self.y_mean) / self.y_std
        return scaled.reshape(np.shape(y)).astype(np.float32)

    def _target_moments(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(y_mean, y_std) of a regression's targets, None for classes (every constructor
        here sets both or neither; one without the other is a programming error)."""
        if self.y_mean is None:
            return None
        if self.y_std is None:
            raise ValueError("standardization: a target mean without a standard deviation")
        return self.y_mean, self.y_std

    def output_scale(self) -> tuple[np.ndarray, np.ndarray]:
        """(scale, offset) that turn a standardized output into the target's scale
        (1 and 0 for classes)."""
        target = self._target_moments()
        if target is None:
            return UNSCALED
        y_mean, y_std = target
        return y_std.astype(np.float32), y_mean.astype(np.float32)

    def wrap(self, model: keras.Model, input_shape: tuple[int, ...]) -> keras.Model:
        """`model` (taking `input_shape`) between the Normalization layer and, for a
        regression, a Rescaling of its output to the target's scale, compiled as `model` is;
        the same weights (the two layers hold constants)."""
        inputs = keras.Input(input_shape)
        outputs = model(self.normalization()(inputs))
        if self.y_mean is not None:
            scale, offset = self.output_scale()
            outputs = keras.layers.Rescaling(scale.tolist(), offset.tolist())(outputs)
        wrapped = keras.Model(inputs, outputs, name=f"standardized_{model.name}")
        wrapped.compile_from_config(model.get_compile_config())
        return wrapped

    def to_bytes(self) -> bytes:
        """The statistics as `.npz` bytes (what the fit and evaluate configs carry)."""
        buffer = io.BytesIO()
        # (Typed Any: numpy's stub matches a ** mapping of arrays against a bool.)
        arrays: dict[str, Any] = {"x_mean": self.x_mean, "x_variance": self.x_variance}
        target = self._target_moments()
        if target is not None:
            arrays.update(y_mean=target[0], y_std=target[1])
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    @classmethod
    @lru_cache(maxsize=2)  # every fit and evaluate config of a run carries the same bytes
    def from_bytes(cls, data: bytes, spec: DataSpec) -> Standardization:
        """The statistics `to_bytes` wrote for data of `spec` (decoded once per distinct
        bytes), checked before any array is read: at most the bytes such statistics take,
        exactly their arrays by name, float64 of the shapes `spec` gives (its features; a
        regression's targets), finite, variances and standard deviations > 0. ValueError
        naming the problem otherwise (a deviating server's zip bomb, another data set's
        statistics)."""
        expected = _arrays(spec)
        limit = sum(_NPY_OVERHEAD + 8 * math.prod(shape) for shape in expected.values())
        if len(data) > limit:
            raise ValueError(f"standardization: {len(data)} bytes, more than the {limit} the "
                             f"statistics of this client's data take")
        if not data.startswith(b"PK\x03\x04"):
            raise ValueError("standardization: not an .npz archive")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
                _check_headers(arrays.zip, expected, limit)
                standardization = cls(**{name: arrays[name] for name in expected})
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"standardization: not the statistics of this client's data "
                             f"({error})") from None
        if not all(np.isfinite(a).all() for a in vars(standardization).values() if a is not None):
            raise ValueError("standardization: a statistic is not finite")
        if np.any(standardization.x_variance <= 0) or (
                standardization.y_std is not None and np.any(standardization.y_std <= 0)):
            raise ValueError("standardization: a variance or standard deviation is not > 0")
        return standardization


_NPY_OVERHEAD = 1024  # bytes of an .npz member's zip headers and .npy header, generously


def _arrays(spec: DataSpec) -> dict[str, tuple[int, ...]]:
    """The arrays (name: shape) of the statistics of data of `spec`."""
    features = (spec.input_shape[-1],)
    if spec.task != "regression":
        return {"x_mean": features, "x_variance": features}
    targets = (spec.num_targets,)
    return {"x_mean": features, "x_variance": features, "y_mean": targets, "y_std": targets}


def _check_headers(archive: zipfile.ZipFile, expected: dict[str, tuple[int, ...]],
                   limit: int) -> None:
    """ValueError unless `archive` holds exactly the `expected` arrays, each declaring at
    most `limit` bytes and a float64 array of its shape in its `.npy` header (read before
    any data, so a header's shape cannot make the loader allocate)."""
    members = [info.filename for info in archive.infolist()]
    if sorted(members) != sorted(f"{name}.npy" for name in expected):
        raise ValueError(f"arrays {members}, expected {sorted(expected)}")
    for info in archive.infolist():
        if info.file_size > limit:
            raise ValueError(f"{info.filename} declares {info.file_size} bytes")
        with archive.open(info) as member:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(member)
        name = info.filename.removesuffix(".npy")
        if shape != expected[name] or dtype != np.float64:
            raise ValueError(f"{name} is {dtype} of shape {shape}, expected float64 of shape "
                             f"{expected[name]}")


def from_moments(sums: list[np.ndarray]) -> Standardization:
    """The pooled statistics from the clients' summed `moments` (a target's only when the
    clients sent one)."""
    counts, x_sum, x_squares, y_sum, y_squares = sums
    x_mean, x_variance = _mean_variance(float(counts[0]), x_sum, x_squares)
    if not len(y_sum):
        return Standardization(x_mean, x_variance)
    y_mean, y_variance = _mean_variance(float(counts[1]), y_sum, y_squares)
    return Standardization(x_mean, x_variance, y_mean, np.sqrt(y_variance))
