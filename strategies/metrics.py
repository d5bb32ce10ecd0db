"""Weighted aggregation of client metrics."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.common import Metrics, Scalar


def weighted_metrics(results: Iterable[tuple[int, Metrics]]) -> dict[str, Scalar]:
    """Average every numeric metric over the clients that report it, weighted by examples."""
    sums: dict[str, float] = {}
    weights: dict[str, int] = {}
    for num_examples, metrics in results:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                sums[key] = sums.get(key, 0.0) + num_examples * float(value)
                weights[key] = weights.get(key, 0) + num_examples
    return {key: sums[key] / weights[key] for key in sums if weights[key] > 0}
