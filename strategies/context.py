"""What every strategy factory receives (the run config and the server's callbacks), and
the client-sampling keys every strategy shares."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flwr.common import NDArrays, Parameters, Scalar

from fl_app.schema import ConfigError, LayerSettings, RunConfig, Setting
from fl_app.schema import Scalar as ConfigValue
from fl_app.wire import CLIENT_SAMPLING
from strategies.metrics import weighted_metrics
from strategies.secure import evaluate_fraction, protected

SETTINGS = [
    Setting("fraction-fit", float, 1.0, "Fraction of available clients sampled for training.",
            "sampling", low=0.0, high=1.0, low_open=True),
    Setting("fraction-evaluate", float, 1.0,
            "Fraction of available clients sampled for distributed evaluation (0 disables).",
            "sampling", low=0.0, high=1.0),
    Setting(CLIENT_SAMPLING, str, "uniform",
            "How the sampled clients are drawn: uniform, or size (each with probability "
            "proportional to the training-set size it reports, as the q-FFL paper samples "
            "devices; pair it with an aggregation that does not weigh by size again, such as "
            "qfedavg); a size above max-examples counts as 1, one above examples-cap-factor x "
            "the clients' median size as that cap. Not with DP, secure aggregation, HE or "
            "server-loop=fedbuff.",
            "sampling", choices=("uniform", "size")),
    Setting("min-fit-clients", int, 2, "Minimum number of clients sampled for training.",
            "sampling", low=1),
    Setting("min-evaluate-clients", int, 2, "Minimum number of clients sampled for evaluation.",
            "sampling", low=0),
    Setting("min-available-clients", int, 2,
            "Minimum number of connected clients to start a round.", "sampling", low=1),
    Setting("accept-failures", bool, True,
            "Aggregate a round even if some clients failed (otherwise skip the round).",
            "sampling"),
]


def check_config(values: Mapping[str, ConfigValue]) -> None:
    """Refuse a sampling minimum no round could meet, and sampling by size where each
    client's size must not reach the server (DP, secure aggregation, HE: the DP accounting
    also assumes uniform sampling) or where the loop samples otherwise (FedBuff)."""
    if int(values["min-fit-clients"]) > int(values["min-available-clients"]):
        raise ConfigError(
            f"run-config key 'min-fit-clients' ({values['min-fit-clients']}) must not exceed "
            f"'min-available-clients' ({values['min-available-clients']})"
        )
    if values[CLIENT_SAMPLING] == "size" and (str(values["strategy"]).startswith("dp-")
                                              or protected(values)
                                              or values["server-loop"] == "fedbuff"):
        raise ConfigError(
            f"run-config key '{CLIENT_SAMPLING}'='size' cannot work with DP, secure "
            "aggregation, homomorphic encryption or server-loop='fedbuff': each client "
            "would tell the server its size in the clear (and DP's accounting assumes "
            f"uniform sampling); use {CLIENT_SAMPLING}='uniform'")


@dataclass(frozen=True)
class SamplingSettings(LayerSettings):
    """The sampling keys every strategy takes (this module's `SETTINGS`; the evaluation
    fraction is `secure.evaluate_fraction`'s, which joins it with the protection keys)."""

    fraction_fit: float
    min_fit_clients: int
    min_evaluate_clients: int
    min_available_clients: int
    accept_failures: bool


EvaluateFn = Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None]
"""A server-side evaluation: round, global weights, config -> (loss, metrics), or None."""
ConfigFn = Callable[[int], dict[str, Scalar]]
"""A round's fit or evaluate config, by round."""


@dataclass
class StrategyContext:
    """Inputs to a strategy factory: config, initial model and server-side callbacks."""

    cfg: RunConfig
    initial_parameters: Parameters
    evaluate_fn: EvaluateFn | None = None
    on_fit_config_fn: ConfigFn | None = None
    on_evaluate_config_fn: ConfigFn | None = None

    def common_kwargs(self) -> dict[str, Any]:
        """Keyword arguments every Flower-style strategy takes (sampling, callbacks, ...);
        the evaluation fraction is `secure.evaluate_fraction` (0 in a protected run)."""
        sampling = SamplingSettings.from_config(self.cfg)
        return dict(
            fraction_fit=sampling.fraction_fit,
            fraction_evaluate=evaluate_fraction(self.cfg),
            min_fit_clients=sampling.min_fit_clients,
            min_evaluate_clients=sampling.min_evaluate_clients,
            min_available_clients=sampling.min_available_clients,
            evaluate_fn=self.evaluate_fn,
            on_fit_config_fn=self.on_fit_config_fn,
            on_evaluate_config_fn=self.on_evaluate_config_fn,
            accept_failures=sampling.accept_failures,
            initial_parameters=self.initial_parameters,
        )

    def flower_kwargs(self) -> dict[str, Any]:
        """`common_kwargs` plus weighted metric aggregation, for Flower's built-ins."""
        return dict(self.common_kwargs(), fit_metrics_aggregation_fn=weighted_metrics,
                    evaluate_metrics_aggregation_fn=weighted_metrics)
