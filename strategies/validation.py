"""Client-update validation shared by every strategy we ship.

An update is rejected (logged with the client id and reason, counted, never averaged in)
when it has the wrong number of arrays, a wrong shape or dtype, a non-finite value, or
claims `num_examples` <= 0 or above `max-examples`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
from flwr.common import FitRes, NDArrays, Parameters, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_proxy import ClientProxy

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


def validate_fit_results(results: FitResults, reference: NDArrays, server_round: int,
                         max_examples: int = 0) -> ValidatedResults:
    """Split fit results into accepted and rejected updates; log every rejection."""
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
            log(WARNING, "round %s: rejected update from client %s: %s",
                server_round, proxy.cid, problem)
            out.rejected.append((proxy.cid, problem))
    return out


def reference_arrays(parameters: Parameters | None) -> NDArrays:
    """The global model as arrays (empty if none is known yet)."""
    return [] if parameters is None else parameters_to_ndarrays(parameters)
