"""The one validation path: every strategy the registry builds sits behind it.

`ValidatedStrategy` rejects invalid client updates and evaluation reports (the checks of
`strategies.validation`) before the strategy it wraps sees them: ours, Flower's built-ins
and the DP wrappers alike. It is also the one place of the `min-fit-clients` rule.
"""

from __future__ import annotations

from dataclasses import replace
from logging import WARNING

from flwr.common import EvaluateRes, FitIns, FitRes, NDArrays, Parameters, Scalar
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from strategies.running_sum import RunningWeightedSum
from strategies.validation import (
    NUM_CAPPED,
    NUM_REJECTED,
    FitResults,
    Rejections,
    Res,
    cap_claims,
    cast_like,
    claim_cap,
    reference_arrays,
    reject,
    validate_evaluate_results,
    validate_fit_results,
)
from strategies.weighted_fedavg import sums_updates
from strategies.wrapper import StrategyWrapper

RESERVED = {NUM_REJECTED, NUM_CAPPED}  # the server's counts: never taken from a client


def _without_reserved_metrics(
        results: list[tuple[ClientProxy, Res]]) -> list[tuple[ClientProxy, Res]]:
    """The results with any client-reported `num_rejected`/`num_capped` metric dropped: those
    counts are the server's, and a client must not be able to forge them."""
    return [(proxy, replace(res, metrics={k: v for k, v in res.metrics.items()
                                          if k not in RESERVED}))
            if RESERVED & set(res.metrics) else (proxy, res) for proxy, res in results]


class ValidatedStrategy(StrategyWrapper):
    """Rejects invalid client updates and evaluation reports before `inner` sees them.

    Checks each update against the global model sent this round (or the initial one
    before the first round): see `strategies.validation`. Adds `num_rejected` (ours plus
    any the inner strategy rejected itself) to the round's fit and evaluate metrics.
    With fewer than `min_fit_clients` valid updates the round keeps the previous global
    model; `min_fit_clients=0` never holds a round back (the DP wrappers release every
    round: skipping one would reveal, un-noised, that clients failed).
    The aggregate keeps the dtypes of the model sent (Flower's FedOpt family computes in
    float64, which would otherwise make every float32 client update mismatch next round).
    When `inner` is the weighted average (`sums_updates`: WeightedFedAvg) each update is
    decoded once, without a copy, and checked and folded into a `RunningWeightedSum` in
    one pass; any other inner strategy gets the accepted results to decode itself.

    Args:
        inner: the strategy that aggregates the valid updates.
        min_fit_clients: fewest valid updates that make a new global model (0: no minimum).
        max_examples: cap on a client's claimed `num_examples` (0: no cap).
        outlier_norm_factor: reject updates whose norm exceeds this factor times the
            round's median update norm (0: off).
        examples_cap_factor: cap claimed `num_examples` at this factor times the round's
            lower median claim (0: off); capped claims are counted as `num_capped`.
    """

    def __init__(self, inner: Strategy, *, min_fit_clients: int, max_examples: int = 0,
                 outlier_norm_factor: float = 0.0, examples_cap_factor: float = 0.0) -> None:
        super().__init__(inner)
        self.min_fit_clients = min_fit_clients
        self.max_examples = max_examples
        self.outlier_norm_factor = outlier_norm_factor
        self.examples_cap_factor = examples_cap_factor
        self._sent: Parameters | None = None

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Remember the initial global model (the reference until a round is sent)."""
        parameters = self.inner.initialize_parameters(client_manager)
        self._sent = parameters
        return parameters

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Remember the global model sent this round, then delegate."""
        self._sent = parameters
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Drop invalid updates, then let the inner strategy aggregate the rest.

        Raises RuntimeError if no global model was sent or initialized yet.
        """
        reference = reference_arrays(self._sent, self, server_round)
        if sums_updates(self.inner):
            return self._aggregate_sum(server_round, results, failures, reference)
        checked = validate_fit_results(results, reference, server_round,
                                       self.max_examples, self.outlier_norm_factor)
        if len(checked.accepted) < self.min_fit_clients:
            return self._too_few(server_round, len(checked.accepted), checked.rejected)
        accepted, capped = cap_claims(_without_reserved_metrics(checked.accepted),
                                      self.examples_cap_factor, server_round)
        parameters, metrics = self.inner.aggregate_fit(server_round, accepted, failures)
        if parameters is not None:
            parameters = cast_like(parameters, reference)
        return parameters, {**_with_rejections(metrics, len(checked.rejected)),
                            NUM_CAPPED: capped}

    def _aggregate_sum(
        self,
        server_round: int,
        results: FitResults,
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
        reference: NDArrays,
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """`aggregate_fit` for an inner weighted average (`sums_updates`): each update is
        decoded once without a copy, and checked and folded into a `RunningWeightedSum` in
        one pass over its values; the inner strategy gets the sum, not the updates.

        The claims are capped before the fold, at the cap of the claims whose arrays have
        the right number, shapes and dtypes; when a non-finite update rejected during the
        fold moves that cap, the kept updates are folded again with the round's cap.
        """
        checked = validate_fit_results(results, reference, server_round, self.max_examples,
                                       self.outlier_norm_factor, values=False)
        candidates = _without_reserved_metrics(checked.accepted)
        cap = claim_cap([res.num_examples for _, res in candidates], self.examples_cap_factor)
        total = RunningWeightedSum(reference)
        accepted, kept, weights = [], [], []
        for (proxy, res), arrays in zip(candidates, checked.accepted_arrays):
            weight = res.num_examples if cap is None else min(res.num_examples, cap)
            problem = total.add(arrays, weight)
            if problem is None:
                accepted.append((proxy, res))
                kept.append(arrays)
                weights.append(weight)
            else:
                reject(checked.rejected, "update", proxy, problem, server_round)
        if len(accepted) < self.min_fit_clients:
            return self._too_few(server_round, len(accepted), checked.rejected)
        accepted, capped = cap_claims(accepted, self.examples_cap_factor, server_round)
        if weights != [res.num_examples for _, res in accepted]:
            total = RunningWeightedSum(reference)
            for arrays, (_, res) in zip(kept, accepted):
                total.add(arrays, res.num_examples)
        parameters, metrics = self.inner.aggregate_sum(server_round, total, accepted, failures)
        return parameters, {**_with_rejections(metrics, len(checked.rejected)),
                            NUM_CAPPED: capped}

    def _too_few(self, server_round: int, valid: int,
                 rejected: Rejections) -> tuple[None, dict[str, Scalar]]:
        """The answer of a round with fewer than `min_fit_clients` valid updates (logged)."""
        log(WARNING, "round %s: only %s valid update(s), fewer than min-fit-clients=%s: "
            "keeping the previous global model", server_round, valid, self.min_fit_clients)
        return None, {NUM_REJECTED: len(rejected)}

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Drop invalid evaluation reports, then let the inner strategy aggregate the rest."""
        checked = validate_evaluate_results(results, server_round, self.max_examples)
        accepted, capped = cap_claims(_without_reserved_metrics(checked.accepted),
                                      self.examples_cap_factor, server_round)
        loss, metrics = self.inner.aggregate_evaluate(server_round, accepted, failures)
        return loss, {**_with_rejections(metrics, len(checked.rejected)), NUM_CAPPED: capped}


def _with_rejections(metrics: dict[str, Scalar], rejected: int) -> dict[str, Scalar]:
    """`metrics` with `num_rejected` = ours plus the inner strategy's own rejections."""
    return {**metrics, NUM_REJECTED: rejected + int(metrics.get(NUM_REJECTED, 0))}
