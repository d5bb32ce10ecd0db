"""The checks behind `ValidatedStrategy` (strategies.validated), which every strategy sits behind.

An update is rejected (logged with the client id and reason, counted, never averaged in)
when it has the wrong number of arrays, a wrong shape or dtype, a non-finite value, or
claims `num_examples` <= 0 or above `max-examples`. Optionally (`outlier-norm-factor` k > 0)
an update whose norm ||client weights - global weights|| exceeds k times the median update
norm of the round's otherwise valid updates is rejected as an outlier (the check is skipped
in a round whose median update norm is 0). An evaluation report is rejected when it claims
`num_examples` <= 0 or above `max-examples`, or a non-finite loss. Claims of accepted
updates and reports above `examples-cap-factor` times the round's lower median claim are
capped (`cap_claims`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from logging import WARNING
from typing import TypeVar

import numpy as np
from flwr.common import (
    EvaluateRes,
    FitRes,
    NDArrays,
    Parameters,
)
from flwr.common.logger import log
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fl_app.protocol.clipping import l2_norm, model_update
from fl_app.schema import Scalar, Setting
from strategies.blas import one_blas_thread
from strategies.decoding import decode, encode
from strategies.metrics import is_finite_number


def _off_or_factor(value: Scalar) -> bool:
    """Whether a factor setting's value is 0 (off) or a factor >= 1 (`Setting.coerce` has
    made it a float before it asks)."""
    return isinstance(value, float) and (value == 0.0 or value >= 1.0)


SETTINGS = [
    Setting("max-examples", int, 0,
            "Reject updates claiming more than this many examples (0: no cap).", "sampling",
            low=0),
    Setting("examples-cap-factor", float, 3.0,
            "Cap a client's claimed num_examples at this factor f times the round's lower "
            "median claim (logged, counted as num_capped): of n clients, one that lies gets "
            "at most f/(n-1+f) of the average's weight (0 disables).", "sampling",
            check=_off_or_factor, check_hint="0 (off) or a factor >= 1"),
    Setting("outlier-norm-factor", float, 0.0,
            "Reject updates whose norm (client minus global weights) exceeds this factor times "
            "the round's median update norm (0 disables).", "sampling",
            check=_off_or_factor, check_hint="0 (off) or a factor >= 1"),
]

NUM_REJECTED = "num_rejected"  # fit/evaluate metric: the round's rejected client reports
NUM_CAPPED = "num_capped"  # fit/evaluate metric: claims of num_examples cut to the cap

FitResults = list[tuple[ClientProxy, FitRes]]
EvaluateResults = list[tuple[ClientProxy, EvaluateRes]]
Rejections = list[tuple[str, str]]  # (client id, reason)


def examples_problem(num_examples: object, max_examples: int = 0) -> str | None:
    """Why a claimed `num_examples` must be rejected, or None if it is acceptable.

    It must be a positive integer, and at most `max_examples` when that is > 0.
    """
    if not isinstance(num_examples, (int, np.integer)) or num_examples <= 0:
        return f"num_examples={num_examples!r} is not a positive integer"
    if max_examples and num_examples > max_examples:
        return f"num_examples={num_examples} exceeds the cap max-examples={max_examples}"
    return None


def structure_problem(arrays: NDArrays, reference: NDArrays) -> str | None:
    """Why `arrays` do not match `reference` (the global model sent this round) array by
    array in number, shape and dtype, or None if they do. Reads no array data."""
    if len(arrays) != len(reference):
        return f"{len(arrays)} arrays, expected {len(reference)}"
    for i, (got, want) in enumerate(zip(arrays, reference)):
        if got.shape != want.shape:
            return f"array {i} has shape {got.shape}, expected {want.shape}"
        if got.dtype is not want.dtype and got.dtype != want.dtype:
            return f"array {i} has dtype {got.dtype}, expected {want.dtype}"
    return None


def is_finite(array: np.ndarray) -> bool:
    """Whether every value of `array` is finite.

    A float array's dot product with itself (one BLAS pass, no temporary) is finite when
    every value is; only when it is not (a NaN or infinity, or a sum of squares beyond the
    dtype's range) are the values checked one by one. Call it under
    `np.errstate(over="ignore", invalid="ignore")` to silence numpy's warning on those.
    """
    if array.dtype.kind == "f" and array.dtype.itemsize >= 4 and array.size:
        flat = array.reshape(-1)
        if np.isfinite(np.dot(flat, flat)):
            return True
    return bool(np.all(np.isfinite(array)))


def nonfinite_problem(arrays: NDArrays) -> str | None:
    """Why `arrays` must be rejected for a NaN or infinite value, or None."""
    with np.errstate(over="ignore", invalid="ignore"):
        for i, array in enumerate(arrays):
            if not is_finite(array):
                return f"array {i} contains NaN or infinite values"
    return None


def arrays_problem(arrays: NDArrays, reference: NDArrays) -> str | None:
    """Why an update's decoded `arrays` cannot be averaged with the global model
    `reference` (`structure_problem`, then `nonfinite_problem`, on one BLAS thread), or
    None: the check every path runs before an update touches a sum."""
    with one_blas_thread():
        return structure_problem(arrays, reference) or nonfinite_problem(arrays)


def update_problem(arrays: NDArrays, num_examples: int, reference: NDArrays,
                   max_examples: int = 0) -> str | None:
    """Why this update must be rejected, or None if it is acceptable.

    `reference` is the global model sent this round: the update must match it array by
    array in shape and dtype. `max_examples` > 0 caps the claimed number of examples.
    """
    return examples_problem(num_examples, max_examples) or arrays_problem(arrays, reference)


def evaluate_problem(res: EvaluateRes, max_examples: int = 0) -> str | None:
    """Why a client's evaluation report must be rejected, or None if it is acceptable."""
    problem = examples_problem(res.num_examples, max_examples)
    if problem is None and not is_finite_number(res.loss):
        problem = f"loss={res.loss!r} is not a finite number"
    return problem


@dataclass
class ValidatedResults:
    """The outcome of validating one round's fit results."""

    accepted: FitResults = field(default_factory=list)
    accepted_arrays: list[NDArrays] = field(default_factory=list)
    rejected: Rejections = field(default_factory=list)


@dataclass
class ValidatedEvaluations:
    """The outcome of validating one round's evaluate results."""

    accepted: EvaluateResults = field(default_factory=list)
    rejected: Rejections = field(default_factory=list)


def update_norm(arrays: NDArrays, reference: NDArrays) -> float:
    """L2 norm, over all layers, of the update `arrays - reference` (computed in float64)."""
    return l2_norm(model_update(arrays, reference))


def reject(rejected: Rejections, what: str, proxy: ClientProxy, problem: str,
           server_round: int) -> None:
    """Log the rejection of a client's update or report and append it to `rejected`."""
    log(WARNING, "round %s: rejected %s from client %s: %s", server_round, what, proxy.cid,
        problem)
    rejected.append((proxy.cid, problem))


def _drop_norm_outliers(checked: ValidatedResults, reference: NDArrays, factor: float,
                        server_round: int) -> ValidatedResults:
    """Reject accepted updates whose norm exceeds `factor` x the median accepted norm.

    A median of 0 (most clients sent the global model back unchanged) gives no scale to
    compare against, so the check is skipped that round rather than rejecting every
    non-zero update.
    """
    norms = [update_norm(arrays, reference) for arrays in checked.accepted_arrays]
    median = float(np.median(norms))
    if median == 0.0:
        log(WARNING, "round %s: outlier-norm-factor check skipped: the median update norm is 0",
            server_round)
        return checked
    out = ValidatedResults(rejected=list(checked.rejected))
    for entry, arrays, norm in zip(checked.accepted, checked.accepted_arrays, norms):
        if norm > factor * median:
            reject(out.rejected, "update", entry[0],
                    f"update norm {norm:.4g} exceeds outlier-norm-factor={factor:g} x the "
                    f"round's median update norm ({median:.4g})", server_round)
        else:
            out.accepted.append(entry)
            out.accepted_arrays.append(arrays)
    return out


def decode_update(fit_res: FitRes, max_examples: int = 0) -> tuple[NDArrays | None, str | None]:
    """An update's arrays (zero-copy, `strategies.decoding.decode`), or why it is rejected
    before they are compared with the global model: a claim `examples_problem` refuses, or
    bytes that do not decode."""
    try:
        arrays = decode(fit_res.parameters)
    except Exception as err:  # undecodable bytes from a broken client
        return None, f"parameters cannot be decoded: {err}"
    problem = examples_problem(fit_res.num_examples, max_examples)
    return (None, problem) if problem else (arrays, None)


def validate_fit_results(results: FitResults, reference: NDArrays, server_round: int,
                         max_examples: int = 0,
                         outlier_norm_factor: float = 0.0) -> ValidatedResults:
    """Split fit results into accepted and rejected updates; log every rejection.

    With `outlier_norm_factor` > 0, updates that pass the per-update checks are then
    screened against the median update norm of the round (see `update_norm`).
    """
    out = ValidatedResults()
    for proxy, fit_res in results:
        arrays, problem = decode_update(fit_res, max_examples)
        if arrays is not None:
            problem = arrays_problem(arrays, reference)
        if problem is None:
            assert arrays is not None  # decode_update gives the arrays or a problem
            out.accepted.append((proxy, fit_res))
            out.accepted_arrays.append(arrays)
        else:
            reject(out.rejected, "update", proxy, problem, server_round)
    if outlier_norm_factor and out.accepted:
        out = _drop_norm_outliers(out, reference, outlier_norm_factor, server_round)
    return out


def validate_evaluate_results(results: EvaluateResults, server_round: int,
                              max_examples: int = 0) -> ValidatedEvaluations:
    """Split evaluate results into accepted and rejected reports; log every rejection."""
    out = ValidatedEvaluations()
    for proxy, res in results:
        problem = evaluate_problem(res, max_examples)
        if problem is None:
            out.accepted.append((proxy, res))
        else:
            reject(out.rejected, "evaluation", proxy, problem, server_round)
    return out


Res = TypeVar("Res", FitRes, EvaluateRes)


def claim_cap(claims: list[int], factor: float, *, is_sorted: bool = False) -> int | None:
    """The cap `cap_claims` puts on claims: `factor` x their lower median (None: no cap).
    `is_sorted`: the claims are in ascending order (the median is read, not sorted for)."""
    if not factor or not claims:
        return None
    median = claims[(len(claims) - 1) // 2] if is_sorted else statistics.median_low(claims)
    return max(1, int(factor * median))


def cap_claims(results: list[tuple[ClientProxy, Res]], factor: float,
               server_round: int) -> tuple[list[tuple[ClientProxy, Res]], int]:
    """Cap every claimed `num_examples` at `factor` x the round's lower median claim.

    The lower median cannot be raised by fewer than half of the clients, so a client
    claiming 10^12 examples gets at most `factor` times a typical client's weight instead
    of the whole average. Returns the results (unchanged objects where no claim is capped,
    so the average stays exactly Flower's) and how many were capped, each logged.
    """
    cap = claim_cap([res.num_examples for _, res in results], factor)
    if cap is None:
        return results, 0
    out, capped = [], 0
    for proxy, res in results:
        if res.num_examples > cap:
            log(WARNING, "round %s: client %s claims %s examples, capped at %s "
                "(examples-cap-factor=%g x the round's median claim)", server_round, proxy.cid,
                res.num_examples, cap, factor)
            res, capped = replace(res, num_examples=cap), capped + 1
        out.append((proxy, res))
    return out, capped


def cast_like(parameters: Parameters, reference: NDArrays) -> Parameters:
    """`parameters` with each array cast to the dtype of its `reference` counterpart."""
    arrays = decode(parameters)
    if len(arrays) != len(reference) or all(a.dtype == r.dtype for a, r in zip(arrays, reference)):
        return parameters
    return encode([a.astype(r.dtype) for a, r in zip(arrays, reference)])


def reference_arrays(parameters: Parameters | None, owner: Strategy,
                     server_round: int) -> NDArrays:
    """The global model sent this round, as arrays, to validate updates against.

    Raises RuntimeError when `owner` knows no global model: neither its
    `initialize_parameters` nor its `configure_fit` was called before `aggregate_fit`
    (every update would otherwise be rejected as mis-shaped).
    """
    if parameters is None:
        raise RuntimeError(f"round {server_round}: {owner!r}.aggregate_fit was called before "
                           "configure_fit, so there is no global model to validate client "
                           "updates against")
    return decode(parameters)
