"""The base of every strategy that wraps an inner one (composition instead of copying FedAvg)."""

from __future__ import annotations

from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from strategies.protocols import StrategyState
from strategies.state import set_strategy_state, strategy_state


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
