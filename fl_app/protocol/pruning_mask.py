"""Magnitude pruning's maths, the same on server and client: Zhu & Gupta's cubic schedule
(`scheduled_sparsity`), the mask a sparsity gives a model (`magnitude_mask`, a function of
the values alone, so both sides derive it from the same weights without sending it), and
the client's check that a round's sparsity is the one its own run config schedules
(`check_round_sparsity`). The server's side is `strategies.pruning.PrunedStrategy`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.common.typing import NDArrays, Scalar

from fl_app.wire import KEY_PRUNE_SPARSITY, SERVER_ROUND


def scheduled_sparsity(server_round: int, target: float, rounds: int) -> float:
    """The sparsity of the global model after `server_round` (0: the initial model) on the
    cubic schedule that reaches `target` after `rounds` rounds and stays there."""
    progress = min(max(server_round, 0), rounds) / rounds
    return target * (1.0 - (1.0 - progress) ** 3)


def magnitude_mask(weights: NDArrays, sparsity: float) -> list[np.ndarray]:
    """Per array, True where magnitude pruning to `sparsity` zeroes an entry: the
    ⌊sparsity·n⌋ smallest magnitudes of each array of two or more axes (ties to the lower
    flat index, so the mask is a function of the values alone); nothing in other arrays."""
    mask = []
    for array in weights:
        flat = np.abs(np.asarray(array)).ravel()
        pruned = np.zeros(flat.size, dtype=bool)
        k = int(sparsity * flat.size) if np.ndim(array) >= 2 else 0
        if k:
            threshold = np.partition(flat, k - 1)[k - 1]
            pruned = flat < threshold
            pruned[np.flatnonzero(flat == threshold)[:k - int(pruned.sum())]] = True
        mask.append(pruned.reshape(np.shape(array)))
    return mask


def round_mask(config: Mapping[str, Scalar], weights: NDArrays) -> list[np.ndarray] | None:
    """The mask of the round whose fit `config` this is, derived from the `weights` it sent
    (None when the round prunes nothing)."""
    sparsity = float(config.get(KEY_PRUNE_SPARSITY, 0.0))
    return magnitude_mask(weights, sparsity) if sparsity > 0 else None


def check_round_sparsity(config: Mapping[str, Scalar], target: float, rounds: int) -> None:
    """Raise ValueError unless the sparsity in a fit `config` is the one the client's own run
    config (`prune-sparsity` `target`, `prune-rounds` `rounds`) schedules for the config's
    round: a deviating server must not impose a mask (a sparsity of 0.99 zeroes most of the
    model) that this run did not ask for."""
    server_round = config.get(SERVER_ROUND, 0)
    sent = config.get(KEY_PRUNE_SPARSITY, 0.0)
    expected = (scheduled_sparsity(server_round - 1, target, rounds) if target > 0
                and isinstance(server_round, int) and not isinstance(server_round, bool) else 0.0)
    if (isinstance(sent, bool) or not isinstance(sent, (int, float))
            or not math.isclose(sent, expected, rel_tol=1e-9, abs_tol=1e-12)):
        raise ValueError(f"the server's fit config has {KEY_PRUNE_SPARSITY}={sent!r}, but this "
                         f"run's own prune-sparsity={target:g} and prune-rounds={rounds} "
                         f"schedule {expected:g} for round {server_round!r}: refused, "
                         "nothing sent")


def apply_mask(weights: NDArrays, mask: list[np.ndarray]) -> NDArrays:
    """`weights` with the masked entries set to zero (dtypes kept)."""
    return [np.where(pruned, np.zeros((), np.asarray(w).dtype), w)
            for w, pruned in zip(weights, mask, strict=True)]


def unmasked_entries(weights: NDArrays, mask: list[np.ndarray]) -> int:
    """How many masked entries of `weights` are not zero (an honest update has none)."""
    return sum(int(np.count_nonzero(np.asarray(w)[pruned]))
               for w, pruned in zip(weights, mask, strict=True))
