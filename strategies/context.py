"""What every strategy factory receives: the run config and the server's callbacks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flwr.common import NDArrays, Parameters, Scalar
from flwr.server.strategy import Strategy

from strategies.metrics import weighted_metrics
from strategies.wrapper import ValidatedStrategy

if TYPE_CHECKING:
    from fl_app.config import RunConfig


@dataclass
class StrategyContext:
    """Inputs to a strategy factory: config, initial model and server-side callbacks."""

    cfg: RunConfig
    initial_parameters: Parameters
    evaluate_fn: Callable[[int, NDArrays, dict[str, Scalar]],
                          tuple[float, dict[str, Scalar]] | None] | None = None
    on_fit_config_fn: Callable[[int], dict[str, Scalar]] | None = None
    on_evaluate_config_fn: Callable[[int], dict[str, Scalar]] | None = None

    def common_kwargs(self) -> dict[str, Any]:
        """Keyword arguments every Flower-style strategy takes (sampling, callbacks, ...)."""
        cfg = self.cfg
        return dict(
            fraction_fit=cfg["fraction-fit"],
            fraction_evaluate=cfg["fraction-evaluate"],
            min_fit_clients=cfg["min-fit-clients"],
            min_evaluate_clients=cfg["min-evaluate-clients"],
            min_available_clients=cfg["min-available-clients"],
            evaluate_fn=self.evaluate_fn,
            on_fit_config_fn=self.on_fit_config_fn,
            on_evaluate_config_fn=self.on_evaluate_config_fn,
            accept_failures=cfg["accept-failures"],
            initial_parameters=self.initial_parameters,
        )

    def flower_kwargs(self) -> dict[str, Any]:
        """`common_kwargs` plus weighted metric aggregation, for Flower's built-ins."""
        return dict(self.common_kwargs(), fit_metrics_aggregation_fn=weighted_metrics,
                    evaluate_metrics_aggregation_fn=weighted_metrics)

    def validated(self, strategy: Strategy) -> Strategy:
        """Wrap `strategy` so invalid client updates never reach it."""
        return ValidatedStrategy(strategy, min_fit_clients=self.cfg["min-fit-clients"],
                                 max_examples=self.cfg["max-examples"],
                                 outlier_norm_factor=self.cfg["outlier-norm-factor"])
