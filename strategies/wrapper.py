"""Strategies that wrap an inner strategy (composition instead of copying FedAvg)."""

from __future__ import annotations

from logging import WARNING

from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from strategies.state import StrategyState, set_strategy_state, strategy_state
from strategies.validation import (
    cast_like,
    reference_arrays,
    validate_evaluate_results,
    validate_fit_results,
)


class StrategyWrapper(Strategy):
    """Delegates every `Strategy` method to `inner`; subclasses override what they change."""

    def __init__(self, inner: Strategy) -> None:
        super().__init__()
        self.inner = inner

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Delegate to the inner strategy."""
        return self.inner.initialize_parameters(client_manager)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Delegate to the inner strategy."""
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Delegate to the inner strategy."""
        return self.inner.aggregate_fit(server_round, results, failures)

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        """Delegate to the inner strategy."""
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Delegate to the inner strategy."""
        return self.inner.aggregate_evaluate(server_round, results, failures)

    def evaluate(self, server_round: int,
                 parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """Delegate to the inner strategy."""
        return self.inner.evaluate(server_round, parameters)

    def get_state(self) -> StrategyState:
        """The inner strategy's state; subclasses add their own under their own key."""
        return strategy_state(self.inner)

    def set_state(self, state: StrategyState) -> None:
        """Restore the inner strategy's state (subclasses restore their own key first)."""
        set_strategy_state(self.inner, state)


class ValidatedStrategy(StrategyWrapper):
    """Rejects invalid client updates and evaluation reports before any inner strategy
    (e.g. Flower's) sees them.

    Uses the same checks as `WeightedFedAvg` (see `strategies.validation`) against the
    global model sent this round, adds `num_rejected` to the round's fit and evaluate
    metrics, and keeps the previous global model when fewer than `min_fit_clients`
    updates are valid.
    The aggregate keeps the dtypes of the model sent (Flower's FedOpt family computes in
    float64, which would otherwise make every float32 client update mismatch next round).
    """

    def __init__(self, inner: Strategy, *, min_fit_clients: int, max_examples: int = 0,
                 outlier_norm_factor: float = 0.0) -> None:
        super().__init__(inner)
        self.min_fit_clients = min_fit_clients
        self.max_examples = max_examples
        self.outlier_norm_factor = outlier_norm_factor
        self._sent: Parameters | None = None

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

        Raises RuntimeError if `configure_fit` has not sent a global model yet.
        """
        reference = reference_arrays(self._sent, self, server_round)
        checked = validate_fit_results(results, reference, server_round,
                                       self.max_examples, self.outlier_norm_factor)
        if len(checked.accepted) < self.min_fit_clients:
            log(WARNING, "round %s: only %s valid update(s), fewer than min-fit-clients=%s: "
                "keeping the previous global model", server_round, len(checked.accepted),
                self.min_fit_clients)
            return None, {"num_rejected": len(checked.rejected)}
        parameters, metrics = self.inner.aggregate_fit(server_round, checked.accepted, failures)
        if parameters is not None:
            parameters = cast_like(parameters, reference)
        return parameters, {**metrics, "num_rejected": len(checked.rejected)}

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Drop invalid evaluation reports, then let the inner strategy aggregate the rest."""
        checked = validate_evaluate_results(results, server_round, self.max_examples)
        loss, metrics = self.inner.aggregate_evaluate(server_round, checked.accepted, failures)
        return loss, {**metrics, "num_rejected": len(checked.rejected)}
