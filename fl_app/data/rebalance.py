"""Client-side rebalancing of a client's training data (`rebalance` run-config key).

An imbalanced client (a Dirichlet or pathological partition) trains mostly on its majority
classes. Each mode balances the client's own classes, from its own counts only:

* `class-weight`: every example weighted by Keras' `class_weight` "balanced" rule,
  n / (k * n_c) over the k classes the client holds (as scikit-learn's
  `compute_class_weight("balanced")`); the trainer passes the weights to the compiled loss
  and metrics as `sample_weight`, exactly as `model.fit(class_weight=...)` does.
* `oversample`: each class drawn with replacement up to the largest class's count (the
  originals kept, as imbalanced-learn's `RandomOverSampler`).
* `augment`: the same counts, but each extra example is new: a within-class mixup of two
  of the class's examples (x = l*a + (1-l)*b, l ~ Beta(MIXUP_ALPHA, MIXUP_ALPHA), so the label
  stays exact) with a random MASK_RATE of its features (pixels) set to 0.

Validation data, the example count a client reports and the server's test set are never
rebalanced. Resampling is seeded by the client's seed, round and key, so a round replays.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fl_app.data.types import DataSpec, Split
from fl_app.schema import ConfigError

MODES = ("none", "class-weight", "oversample", "augment")
MIXUP_ALPHA = 1.0  # Beta(1, 1): the mix is uniform between the two examples
MASK_RATE = 0.1  # share of an augmented example's features set to 0
REBALANCE_STREAM = 1  # spawn key of the rebalancing's random stream (the trainer's layers: 0)


def check_rebalance(mode: str, spec: DataSpec) -> None:
    """Raise ConfigError when `mode` rebalances data without single-label classes."""
    if mode != "none" and spec.task not in ("multiclass", "binary"):
        raise ConfigError(f"run-config key 'rebalance' is {mode!r}, but the data is "
                          f"{spec.describe()}: rebalancing needs single-label classes "
                          "(set rebalance='none')")


def class_weights(y: np.ndarray) -> dict[int, float]:
    """Keras `class_weight` for the classes present in `y`: n / (k * n_c)."""
    classes, counts = np.unique(y, return_counts=True)
    return {int(c): len(y) / (len(classes) * int(n)) for c, n in zip(classes, counts)}


def sample_weights(y: np.ndarray) -> np.ndarray:
    """Each example's class weight (`class_weights`), as float32 per-sample weights."""
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    return (len(y) / (len(counts) * counts.astype(np.float64)))[inverse].astype(np.float32)


def _extra_rows(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The rows that extra examples are made from, drawn with replacement within each
    minority class so that every class reaches the largest class's count (class by class,
    in label order: two draws pair rows of the same class)."""
    classes, counts = np.unique(y, return_counts=True)
    return np.concatenate([rng.choice(np.flatnonzero(y == c), size=counts.max() - n)
                           for c, n in zip(classes, counts)])


def oversample(data: Split, rng: np.random.Generator) -> Split:
    """`data` with copies of minority-class examples appended (see the module docstring)."""
    rows = _extra_rows(data.y, rng)
    return Split(np.concatenate([data.x, data.x[rows]]), np.concatenate([data.y, data.y[rows]]))


def augment(data: Split, rng: np.random.Generator) -> Split:
    """`data` with new minority-class examples appended: within-class mixup plus random
    masking (see the module docstring)."""
    rows, partners = _extra_rows(data.y, rng), _extra_rows(data.y, rng)
    mix = rng.beta(MIXUP_ALPHA, MIXUP_ALPHA, size=(len(rows),) + (1,) * (data.x.ndim - 1))
    mixed = mix * data.x[rows] + (1 - mix) * data.x[partners]
    extra = (mixed * (rng.random(mixed.shape) >= MASK_RATE)).astype(data.x.dtype)
    return Split(np.concatenate([data.x, extra]), np.concatenate([data.y, data.y[rows]]))


def rebalance(data: Split, mode: str, seed: Sequence[int]) -> tuple[Split, np.ndarray | None]:
    """The training data and per-sample weights (None: unweighted) that `mode` trains on;
    `seed` (the client's seed, round and key) seeds the resampling."""
    if mode not in MODES:
        raise ValueError(f"unknown rebalance mode {mode!r}; use one of {MODES}")
    if mode == "none":
        return data, None
    if mode == "class-weight":
        return data, sample_weights(data.y)
    rng = np.random.default_rng(np.random.SeedSequence(list(seed),
                                                       spawn_key=(REBALANCE_STREAM,)))
    return (oversample if mode == "oversample" else augment)(data, rng), None
