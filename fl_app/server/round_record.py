"""One round's record (history.json's `rounds[i]`), built alike by both server loops.

The synchronous loop (`fl_app.server.runner`) and FedBuff's (`fl_app.server.fedbuff_loop`,
a "round" is a new version) record a round as

    {"round": r, "fit": fit_section(...), "centralized": evaluation_section(...),
     ... (the synchronous loop's bytes, CPU seconds, distributed evaluation, privacy),
     "seconds": s}

In `fit_section` the server's counts come last, so no client-reported metric can overwrite
them: `num_clients` counts the replies (rejected ones included), `num_sampled` the replies
and the failures, `num_failures` the failures, each failure described in `failures`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flwr.common import Scalar

from fl_app.wire import TIMING_PREFIX


def evaluation_section(loss: float | None, metrics: Mapping[str, Scalar]) -> dict[str, Any]:
    """An evaluation's record: its metrics by Keras name and the loss (the aggregated loss,
    never a client metric named "loss")."""
    out: dict[str, Any] = dict(metrics)
    if loss is not None:
        out["loss"] = float(loss)
    return out


def mean_timing(replies_metrics: Iterable[Mapping[str, Scalar]]) -> dict[str, float]:
    """The clients' mean seconds per phase of their fit message (their `time_*` fit
    metrics, see `fl_app.client.timing`); only recorded, never trusted."""
    phases: dict[str, list[float]] = {}
    for metrics in replies_metrics:
        for key, value in metrics.items():
            if key.startswith(TIMING_PREFIX) and isinstance(value, (int, float)):
                phases.setdefault(key.removeprefix(TIMING_PREFIX), []).append(float(value))
    return {phase: sum(values) / len(values) for phase, values in phases.items()}


def fit_section(metrics: Mapping[str, Any], *, replies: int,
                failures: Sequence[Mapping[str, str | None]], timing: Mapping[str, float],
                **counts: int) -> dict[str, Any]:
    """The fit part of a round's record: the aggregated `metrics`, then the loop's own
    `counts` (e.g. `num_rejected`, `num_stale`) and the server's counts of `replies` and
    described `failures`, then the failures and the clients' mean `timing` (if any)."""
    out: dict[str, Any] = {"num_rejected": 0, **metrics, **counts,
                           "num_sampled": replies + len(failures), "num_clients": replies,
                           "num_failures": len(failures)}
    if failures:
        out["failures"] = failures
    if timing:
        out["timing"] = dict(timing)
    return out
