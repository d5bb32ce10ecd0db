"""Client-update validation shared by every strategy we ship.

An update is rejected (logged with the client id and reason, counted, never averaged in)
when it has the wrong number of arrays, a wrong shape or dtype, a non-finite value, or
claims `num_examples` <= 0 or above `max-examples`. Optionally (`outlier-norm-factor` k > 0)
an update whose norm ||client weights - global weights|| exceeds k times the median update
norm of the round's otherwise valid updates is rejected as an outlier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.common import (
    FitRes,
    NDArrays,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_proxy import ClientProxy

from strategies.clipping import l2_norm, model_update

from fl_app.settings import Setting

SETTINGS = [
    Setting("outlier-norm-factor", float, 0.0,
            "Reject updates whose norm (client minus global weights) exceeds this factor times "
            "the round's median update norm (0 disables).", "sampling",
            check=lambda v: v == 0.0 or v >= 1.0, check_hint="0 (off) or a factor >= 1"),
]

FitResults = list[tuple[ClientProxy, FitRes]]


def update_problem(arrays: NDArrays, num_examples: int, reference: NDArrays,
                   max_examples: int = 0) -> str | None:
    """Why this update must be rejected, or None if it is acceptable.

    `reference` is the global model sent this round: the update must match it array by
    array in shape and dtype. `max_examples` > 0 caps the claimed number of examples.
    """
    if not isinstance(num_examples, (int, np.integer)) or num_examples <= 0:
        return f"num_examples={num_examples!r} is not a positive integer"
    if max_examples and num_examples > max_examples:
        return f"num_examples={num_examples} exceeds the cap max-examples={max_examples}"
    if len(arrays) != len(reference):
        return f"{len(arrays)} arrays, expected {len(reference)}"
    for i, (got, want) in enumerate(zip(arrays, reference)):
        if got.shape != want.shape:
            return f"array {i} has shape {got.shape}, expected {want.shape}"
        if got.dtype != want.dtype:
            return f"array {i} has dtype {got.dtype}, expected {want.dtype}"
        if not np.all(np.isfinite(got)):
            return f"array {i} contains NaN or infinite values"
    return None


@dataclass
class ValidatedResults:
    """The outcome of validating one round's fit results."""

    accepted: FitResults = field(default_factory=list)
    accepted_arrays: list[NDArrays] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (client id, reason)


def update_norm(arrays: NDArrays, reference: NDArrays) -> float:
    """L2 norm, over all layers, of the update `arrays - reference` (computed in float64)."""
    return l2_norm(model_update(arrays, reference))


def _reject(out: ValidatedResults, proxy: ClientProxy, problem: str, server_round: int) -> None:
    log(WARNING, "round %s: rejected update from client %s: %s", server_round, proxy.cid, problem)
    out.rejected.append((proxy.cid, problem))


def _drop_norm_outliers(checked: ValidatedResults, reference: NDArrays, factor: float,
                        server_round: int) -> ValidatedResults:
    """Reject accepted updates whose norm exceeds `factor` x the median accepted norm."""
    norms = [update_norm(arrays, reference) for arrays in checked.accepted_arrays]
    limit = factor * float(np.median(norms))
    out = ValidatedResults(rejected=list(checked.rejected))
    for entry, arrays, norm in zip(checked.accepted, checked.accepted_arrays, norms):
        if norm > limit:
            _reject(out, entry[0], f"update norm {norm:.4g} exceeds outlier-norm-factor={factor:g} "
                    f"x the round's median update norm ({limit / factor:.4g})", server_round)
        else:
            out.accepted.append(entry)
            out.accepted_arrays.append(arrays)
    return out


def validate_fit_results(results: FitResults, reference: NDArrays, server_round: int,
                         max_examples: int = 0,
                         outlier_norm_factor: float = 0.0) -> ValidatedResults:
    """Split fit results into accepted and rejected updates; log every rejection.

    With `outlier_norm_factor` > 0, updates that pass the per-update checks are then
    screened against the median update norm of the round (see `update_norm`).
    """
    out = ValidatedResults()
    for proxy, fit_res in results:
        try:
            arrays = parameters_to_ndarrays(fit_res.parameters)
        except Exception as err:  # undecodable bytes from a broken client
            problem = f"parameters cannot be decoded: {err}"
        else:
            problem = update_problem(arrays, fit_res.num_examples, reference, max_examples)
        if problem is None:
            out.accepted.append((proxy, fit_res))
            out.accepted_arrays.append(arrays)
        else:
            _reject(out, proxy, problem, server_round)
    if outlier_norm_factor and out.accepted:
        out = _drop_norm_outliers(out, reference, outlier_norm_factor, server_round)
    return out


def cast_like(parameters: Parameters, reference: NDArrays) -> Parameters:
    """`parameters` with each array cast to the dtype of its `reference` counterpart."""
    arrays = parameters_to_ndarrays(parameters)
    if len(arrays) != len(reference) or all(a.dtype == r.dtype for a, r in zip(arrays, reference)):
        return parameters
    return ndarrays_to_parameters([a.astype(r.dtype) for a, r in zip(arrays, reference)])


def reference_arrays(parameters: Parameters | None) -> NDArrays:
    """The global model as arrays (empty if none is known yet)."""
    return [] if parameters is None else parameters_to_ndarrays(parameters)
