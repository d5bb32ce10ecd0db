"""WeightedFedAvg: federated averaging weighted by `num_examples`, with update validation."""

from __future__ import annotations

from logging import WARNING
from typing import TypeGuard

import numpy as np
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.strategy.aggregate import weighted_loss_avg

from strategies.context import ConfigFn, EvaluateFn, StrategyContext
from strategies.decoding import decode, encode
from strategies.metrics import weighted_metrics
from strategies.running_sum import RunningWeightedSum
from strategies.spec import StrategySpec


def weighted_average(updates: list[NDArrays], weights: list[float]) -> NDArrays:
    """Average arrays layer by layer, weighted; accumulates in float64, keeps each dtype."""
    total = float(sum(weights))
    averaged = []
    for layer in zip(*updates):
        acc = np.zeros(layer[0].shape, dtype=np.float64)
        for array, weight in zip(layer, weights):
            acc += array.astype(np.float64) * (weight / total)
        averaged.append(acc.astype(layer[0].dtype))
    return averaged


def sample_size(num_available: int, fraction: float, minimum: int) -> int:
    """Number of clients to sample: a fraction of those available, at least `minimum`."""
    return max(int(num_available * fraction), minimum)


class WeightedFedAvg(Strategy):
    """Federated averaging of client weights, weighted by each client's `num_examples`.

    Samples `fraction_fit` of the available clients (at least `min_fit_clients`) and
    averages their updates (`RunningWeightedSum`: float32 arrays summed in float32 as
    Flower's `aggregate` sums them, others in float64; each array keeps its dtype); fit and
    evaluate metrics are averaged with the same weights (non-finite values skipped). It
    trusts its inputs: the registry puts every strategy behind `ValidatedStrategy`
    (strategies.validated), which rejects invalid updates and reports first.

    Args:
        fraction_fit, fraction_evaluate: fraction of available clients sampled per round.
        min_fit_clients, min_evaluate_clients: fewest clients sampled per round.
        min_available_clients: clients that must be connected before sampling.
        evaluate_fn: centralized evaluation `(round, weights, config) -> (loss, metrics)`.
        on_fit_config_fn, on_evaluate_config_fn: the config sent to clients each round.
        accept_failures: aggregate a round in which some clients failed.
        initial_parameters: the initial global model.
    """

    def __init__(
        self,
        *,
        fraction_fit: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_fit_clients: int = 2,
        min_evaluate_clients: int = 2,
        min_available_clients: int = 2,
        evaluate_fn: EvaluateFn | None = None,
        on_fit_config_fn: ConfigFn | None = None,
        on_evaluate_config_fn: ConfigFn | None = None,
        accept_failures: bool = True,
        initial_parameters: Parameters | None = None,
    ) -> None:
        super().__init__()
        self.fraction_fit = fraction_fit
        self.fraction_evaluate = fraction_evaluate
        self.min_fit_clients = min_fit_clients
        self.min_evaluate_clients = min_evaluate_clients
        self.min_available_clients = min_available_clients
        self.evaluate_fn = evaluate_fn
        self.on_fit_config_fn = on_fit_config_fn
        self.on_evaluate_config_fn = on_evaluate_config_fn
        self.accept_failures = accept_failures
        self.initial_parameters = initial_parameters

    def __repr__(self) -> str:
        return f"WeightedFedAvg(accept_failures={self.accept_failures})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """The initial global model (None: Flower asks one client for its weights)."""
        return self.initial_parameters

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Sample clients and send them the global model and this round's fit config."""
        config = self.on_fit_config_fn(server_round) if self.on_fit_config_fn else {}
        n = sample_size(client_manager.num_available(), self.fraction_fit, self.min_fit_clients)
        clients = client_manager.sample(num_clients=n, min_num_clients=self.min_available_clients)
        return [(client, FitIns(parameters, config)) for client in clients]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Average the updates by `num_examples` (None without results, or with failures
        when `accept_failures` is off): each decoded once, without a copy, and folded into
        a `RunningWeightedSum` (float32 weights are summed in float32, as Flower does).

        Raises ValueError on an update that does not match the first one, is not finite or
        whose `num_examples` is not positive: this strategy trusts its inputs (`ValidatedStrategy`
        checks them first).
        """
        if self._declines(server_round, results, failures):
            return None, {}
        updates = [decode(fit_res.parameters) for _, fit_res in results]
        total = RunningWeightedSum(updates[0])
        for (proxy, fit_res), arrays in zip(results, updates):
            problem = total.add(arrays, fit_res.num_examples)
            if problem is not None:
                raise ValueError(f"round {server_round}: the update of client {proxy.cid} "
                                 f"cannot be averaged: {problem}")
        return self.aggregate_sum(server_round, total, results, failures)

    def aggregate_sum(
        self,
        server_round: int,
        total: RunningWeightedSum,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """`aggregate_fit` of updates already folded into `total`, each weighted by its
        result's `num_examples` (`results` give the fit metrics): what `ValidatedStrategy`
        hands over when it checks and folds the updates in one pass."""
        if self._declines(server_round, results, failures):
            return None, {}
        average = total.result()
        if average is None:  # no update was added (total.count == 0)
            return None, {}
        metrics = weighted_metrics((fit_res.num_examples, fit_res.metrics)
                                   for _, fit_res in results)
        return encode(average), metrics

    def _declines(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                  failures: list[tuple[ClientProxy, FitRes] | BaseException]) -> bool:
        """Whether the round makes no new model: no results, or failures while
        `accept_failures` is off (logged)."""
        if not results:
            return True
        if failures and not self.accept_failures:
            log(WARNING, "round %s: %s client(s) failed and accept-failures is off: "
                "keeping the previous global model", server_round, len(failures))
            return True
        return False

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Sample clients for distributed evaluation (none if `fraction_evaluate` is 0)."""
        if self.fraction_evaluate == 0.0:
            return []
        config = self.on_evaluate_config_fn(server_round) if self.on_evaluate_config_fn else {}
        n = sample_size(client_manager.num_available(), self.fraction_evaluate,
                        self.min_evaluate_clients)
        clients = client_manager.sample(num_clients=n, min_num_clients=self.min_available_clients)
        return [(client, EvaluateIns(parameters, config)) for client in clients]

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Average the reports' losses and metrics by `num_examples`."""
        if not results or (failures and not self.accept_failures):
            return None, {}
        loss = weighted_loss_avg([(res.num_examples, res.loss) for _, res in results])
        metrics = weighted_metrics((res.num_examples, res.metrics) for _, res in results)
        return float(loss), metrics

    def evaluate(self, server_round: int,
                 parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Centralized evaluation with `evaluate_fn` (None if there is none)."""
        if self.evaluate_fn is None:
            return None
        return self.evaluate_fn(server_round, parameters_to_ndarrays(parameters), {})


def sums_updates(strategy: Strategy) -> TypeGuard[WeightedFedAvg]:
    """Whether `strategy` aggregates exactly as WeightedFedAvg does (a subclass that keeps
    its `aggregate_fit`; not FedNova), so it can take a `RunningWeightedSum` through
    `aggregate_sum` instead of the updates."""
    return type(strategy).aggregate_fit is WeightedFedAvg.aggregate_fit


def build(ctx: StrategyContext) -> Strategy:
    """Registry factory for `strategy=weighted-fedavg`."""
    return WeightedFedAvg(**ctx.common_kwargs())


SPECS = [StrategySpec("weighted-fedavg", build, sums=True, linear=True,
                      takes_private_average=True)]
SETTINGS: list = []  # WeightedFedAvg uses only the shared sampling keys (strategies.context)
