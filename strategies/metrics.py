"""Weighted aggregation of client metrics."""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real
from typing import TypeGuard

from flwr.common import Metrics, Scalar


def is_finite_number(value: object) -> TypeGuard[float]:
    """Whether `value` is a real number (not a bool) that is neither NaN nor infinite (a
    float to the type checker: an int, a float or a numpy float)."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def weighted_metrics(results: Iterable[tuple[int, Metrics]]) -> dict[str, Scalar]:
    """Average every finite numeric metric over the clients that report it, weighted by
    examples; NaN or infinite values are skipped (they would poison the average)."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for num_examples, metrics in results:
        for key, value in metrics.items():
            if is_finite_number(value):
                sums[key] = sums.get(key, 0.0) + num_examples * float(value)
                weights[key] = weights.get(key, 0) + num_examples
    return {key: sums[key] / weights[key] for key in sums if weights[key] > 0}
