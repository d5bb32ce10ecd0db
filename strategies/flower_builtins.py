"""Flower's built-in strategies, by name (the registry puts each behind our validation).

Those whose `aggregate_fit` depends on the updates only through their weighted average
(`averages_updates`: FedAvg, FedProx, FedAdam, FedYogi, FedAdagrad, FedAvgM) can take the
average from a running sum instead of the updates (`aggregate_average`), so
`ValidatedStrategy` folds their updates as it checks them, or as they arrive.

Flower's `QFedAvg` is not offered: it weights every client by the server's centralized
evaluation loss, not by the client's own, so it is not q-FFL; `qfedavg` is q-FFL as
published (`strategies.qffl`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeGuard

from flwr.common import Code, FitRes, Parameters, Scalar, Status
from flwr.server import strategy as fl
from flwr.server.client_proxy import ClientProxy

from fl_app.schema import LayerSettings, Setting
from strategies.context import StrategyContext
from strategies.decoding import encode
from strategies.running_sum import RunningWeightedSum
from strategies.spec import StrategySpec
from strategies.validation import cast_like

SETTINGS = [
    Setting("proximal-mu", float, 0.01, "FedProx: weight of the proximal term (sent to clients).",
            "strategy", low=0.0),
    Setting("fedopt-eta", float, 0.0,
            "FedAdam/FedYogi/FedAdagrad: server learning rate (0: the strategy's own default, "
            "0.1 for all three: an adaptive server step moves each weight by about eta per "
            "round whatever the update's size, so eta must match one round's step of a weight "
            "on the default workload, whose clients train with SGD(0.1); Flower's FedYogi "
            "default 0.01 reaches 0.71 after 5 rounds where FedAvg reaches 0.93).",
            "strategy", low=0.0),
    Setting("fedopt-tau", float, 0.0,
            "FedAdam/FedYogi/FedAdagrad: adaptivity tau, added to the root mean square that "
            "divides the step; smaller is more adaptive (0: the strategy's own default, "
            "FedAdam and FedYogi 1e-3, FedAdagrad 1e-2: without momentum FedAdagrad's first "
            "steps move every weight, even one whose update is noise, by about eta).",
            "strategy", low=0.0),
    Setting("fedopt-beta-1", float, 0.9, "FedAdam/FedYogi: first-moment decay.", "strategy",
            low=0.0, high=1.0, high_open=True),
    Setting("fedopt-beta-2", float, 0.99, "FedAdam/FedYogi: second-moment decay.", "strategy",
            low=0.0, high=1.0, high_open=True),
    Setting("fedavgm-server-lr", float, 1.0, "FedAvgM: server learning rate.", "strategy",
            low=0.0, low_open=True),
    Setting("fedavgm-momentum", float, 0.9, "FedAvgM: server momentum.", "strategy",
            low=0.0, high=1.0, high_open=True),
    Setting("trimmed-beta", float, 0.2, "FedTrimmedAvg: fraction cut from each tail.", "strategy",
            low=0.0, high=0.5, high_open=True),
    Setting("num-malicious-clients", int, 0, "Krum/Bulyan: assumed number of attackers.",
            "strategy", low=0),
    Setting("krum-num-clients-to-keep", int, 0,
            "Krum: average this many best-scored updates (0: plain Krum).", "strategy", low=0),
    Setting("bulyan-to-keep", int, 0, "Bulyan: updates kept by the Krum stage (0: automatic).",
            "strategy", low=0),
]


@dataclass(frozen=True)
class BuiltinSettings(LayerSettings):
    """The run-config keys of Flower's built-in strategies (this module's `SETTINGS`)."""

    proximal_mu: float
    fedopt_eta: float
    fedopt_tau: float
    fedopt_beta_1: float
    fedopt_beta_2: float
    fedavgm_server_lr: float
    fedavgm_momentum: float
    trimmed_beta: float
    num_malicious_clients: int
    krum_num_clients_to_keep: int
    bulyan_to_keep: int


def _settings(ctx: StrategyContext) -> BuiltinSettings:
    return BuiltinSettings.from_config(ctx.cfg)


FEDOPT_DEFAULTS: dict[str, dict[str, float]] = {
    "fedadam": {"eta": 0.1, "tau": 1e-3},
    "fedyogi": {"eta": 0.1, "tau": 1e-3},
    "fedadagrad": {"eta": 0.1, "tau": 1e-2},
}
"""Each adaptive server optimiser's eta and tau where `fedopt-eta` / `fedopt-tau` are 0: on
the default workload within 0.10 of weighted-fedavg after 5 rounds and 0.05 after 20
(README, "Notes on the defaults"; `scripts/bench/strategies.py` fingerprints them)."""


def _fedopt_kwargs(ctx: StrategyContext, name: str, betas: bool) -> dict:
    settings = _settings(ctx)
    own = FEDOPT_DEFAULTS[name]
    kwargs = dict(ctx.flower_kwargs(), eta=settings.fedopt_eta or own["eta"],
                  tau=settings.fedopt_tau or own["tau"])
    if betas:
        kwargs.update(beta_1=settings.fedopt_beta_1, beta_2=settings.fedopt_beta_2)
    return kwargs


def fedavg(ctx: StrategyContext) -> fl.Strategy:
    """Flower's FedAvg."""
    return fl.FedAvg(**ctx.flower_kwargs())


def fedprox(ctx: StrategyContext) -> fl.Strategy:
    """Flower's FedProx: clients add mu/2 * ||w - w_global||^2 to their loss."""
    return fl.FedProx(**ctx.flower_kwargs(), proximal_mu=_settings(ctx).proximal_mu)


def fedadam(ctx: StrategyContext) -> fl.Strategy:
    """Flower's FedAdam (adaptive server optimizer)."""
    return fl.FedAdam(**_fedopt_kwargs(ctx, "fedadam", betas=True))


def fedyogi(ctx: StrategyContext) -> fl.Strategy:
    """Flower's FedYogi (adaptive server optimizer)."""
    return fl.FedYogi(**_fedopt_kwargs(ctx, "fedyogi", betas=True))


def fedadagrad(ctx: StrategyContext) -> fl.Strategy:
    """Flower's FedAdagrad (adaptive server optimizer)."""
    return fl.FedAdagrad(**_fedopt_kwargs(ctx, "fedadagrad", betas=False))


def fedavgm(ctx: StrategyContext) -> fl.Strategy:
    """Flower's FedAvgM (server momentum)."""
    settings = _settings(ctx)
    return fl.FedAvgM(**ctx.flower_kwargs(), server_learning_rate=settings.fedavgm_server_lr,
                      server_momentum=settings.fedavgm_momentum)


def fedmedian(ctx: StrategyContext) -> fl.Strategy:
    """Flower's FedMedian (coordinate-wise median)."""
    return fl.FedMedian(**ctx.flower_kwargs())


def fedtrimmedavg(ctx: StrategyContext) -> fl.Strategy:
    """Flower's FedTrimmedAvg (coordinate-wise trimmed mean)."""
    return fl.FedTrimmedAvg(**ctx.flower_kwargs(), beta=_settings(ctx).trimmed_beta)


def krum(ctx: StrategyContext) -> fl.Strategy:
    """Flower's Krum (Byzantine-robust selection)."""
    settings = _settings(ctx)
    return fl.Krum(**ctx.flower_kwargs(), num_malicious_clients=settings.num_malicious_clients,
                   num_clients_to_keep=settings.krum_num_clients_to_keep)


def bulyan(ctx: StrategyContext) -> fl.Strategy:
    """Flower's Bulyan (Krum selection + trimmed mean); needs n >= 4f + 3 clients."""
    settings = _settings(ctx)
    return fl.Bulyan(**ctx.flower_kwargs(), num_malicious_clients=settings.num_malicious_clients,
                     to_keep=settings.bulyan_to_keep)


_SERVER_STEP = "takes its own server step (an optimizer on the plaintext model)"
_COMPARES = "is a robust aggregator: it compares individual updates"
SPECS = [
    *(StrategySpec(name, build, sums=True, linear=True, takes_private_average=True)
      for name, build in (("fedavg", fedavg), ("fedprox", fedprox))),
    *(StrategySpec(name, build, needs=_SERVER_STEP, sums=True, linear=False,
                   takes_private_average=True)
      for name, build in (("fedadam", fedadam), ("fedyogi", fedyogi),
                          ("fedadagrad", fedadagrad), ("fedavgm", fedavgm))),
    *(StrategySpec(name, build, needs=_COMPARES, sums=False, linear=False,
                   takes_private_average=True)
      for name, build in (("fedmedian", fedmedian), ("fedtrimmedavg", fedtrimmedavg),
                          ("krum", krum), ("bulyan", bulyan))),
]


AVERAGING = {fl.FedAvg.aggregate_fit, fl.FedAdam.aggregate_fit, fl.FedYogi.aggregate_fit,
             fl.FedAdagrad.aggregate_fit, fl.FedAvgM.aggregate_fit}
"""The `aggregate_fit`s that read the updates only through `aggregate`/`aggregate_inplace`
(FedProx inherits FedAvg's; the FedOpt family steps from FedAvg's average)."""


def averages_updates(strategy: object) -> TypeGuard[fl.FedAvg]:
    """Whether `strategy` is one of Flower's strategies whose `aggregate_fit` depends on the
    updates only through their weighted average by `num_examples` (`AVERAGING`), its fit
    metrics aside (a subclass that overrides `aggregate_fit` is not)."""
    return isinstance(strategy, fl.FedAvg) and type(strategy).aggregate_fit in AVERAGING


def aggregate_average(
    strategy: fl.FedAvg,
    server_round: int,
    total: RunningWeightedSum,
    results: list[tuple[ClientProxy, FitRes]],
    failures: list[tuple[ClientProxy, FitRes] | BaseException],
) -> tuple[Parameters | None, dict[str, Scalar]]:
    """`strategy.aggregate_fit` (an `averages_updates` strategy) of updates already folded
    into `total`, each weighted by its result's `num_examples` (`results` give the fit
    metrics). The strategy aggregates one reply carrying the weighted average (the weighted
    average of one reply is that reply, exactly), with the round's `failures`; its fit
    metrics are its `fit_metrics_aggregation_fn` over `results`, as it computes them. The
    model keeps the dtypes of `total`'s reference (the FedOpt family computes in float64).
    """
    average = total.result()
    if not results or average is None:
        return None, {}
    reply = FitRes(Status(Code.OK, ""), encode(average), 1, {})
    parameters, _ = strategy.aggregate_fit(server_round, [(results[0][0], reply)], failures)
    if parameters is None:
        return None, {}
    parameters = cast_like(parameters, total.reference)
    if strategy.fit_metrics_aggregation_fn is None:
        return parameters, {}
    return parameters, strategy.fit_metrics_aggregation_fn(
        [(res.num_examples, res.metrics) for _, res in results])
