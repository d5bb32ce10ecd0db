"""L2 clipping of a model update over all layers together, shared by server and client.

The update is Δ = w_client − w_global. Clipping scales the whole update (every layer by
the same factor) so that ||Δ||₂ ≤ C, the FlatClip of McMahan et al. (2018); an update
already within C is returned unchanged. Arithmetic is done in float64, so the clipped
update's norm is at most C up to float64 rounding.

The keys that carry C to a client and its "was clipped" bit back are in `fl_app.wire`.
"""

from __future__ import annotations

import numpy as np
from flwr.common import NDArrays


def l2_norm(arrays: NDArrays) -> float:
    """The L2 norm of all arrays taken together as one flat vector (computed in float64)."""
    return float(np.sqrt(sum(np.sum(np.square(a, dtype=np.float64)) for a in arrays)))


def model_update(weights: NDArrays, reference: NDArrays) -> NDArrays:
    """The update `weights - reference`, layer by layer, in float64."""
    return [np.asarray(w, dtype=np.float64) - np.asarray(r, dtype=np.float64)
            for w, r in zip(weights, reference, strict=True)]


def clip_update(update: NDArrays, clip_norm: float) -> tuple[NDArrays, float]:
    """Scale `update` so its L2 norm over all layers is at most `clip_norm`.

    Returns the clipped update (float64) and the norm of the update before clipping.
    """
    if clip_norm <= 0:
        raise ValueError(f"the clip norm must be positive, got {clip_norm}")
    norm = l2_norm(update)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return [np.asarray(u, dtype=np.float64) * scale for u in update], norm


def clip_weights(weights: NDArrays, reference: NDArrays,
                 clip_norm: float) -> tuple[NDArrays, bool]:
    """Clip the update `weights - reference` to `clip_norm`; return new weights and whether
    the update was clipped. The weights keep the dtypes of `reference`."""
    clipped, norm = clip_update(model_update(weights, reference), clip_norm)
    out = [(np.asarray(r, dtype=np.float64) + c).astype(np.asarray(r).dtype)
           for r, c in zip(reference, clipped)]
    return out, norm > clip_norm


def add_noise(weights: NDArrays, std: float, rng: np.random.Generator) -> NDArrays:
    """`weights` plus independent Gaussian noise of std `std` on every value (drawn in
    float64, then cast back to each array's dtype)."""
    return [(np.asarray(w, dtype=np.float64) + rng.normal(0.0, std, np.shape(w))).astype(
        np.asarray(w).dtype) for w in weights]
