"""q-FFL: fair federated learning that weights clients by their own loss (q-FedAvg).

Li, Sanjabi, Beirami and Smith, "Fair Resource Allocation in Federated Learning" (ICLR
2020; official code litian96/fair_flearn, `flearn/trainers/qffedavg.py`). q-FFL minimises
sum_k p_k F_k^(q+1) / (q+1): with q > 0 a client whose loss F_k is high weighs more, and
the model's accuracy spreads more evenly over the clients (q = 0 is the usual average).
q-FedAvg solves it with local training and a step size from the Lipschitz estimate L
(the paper's L = 1 / the clients' learning rate). Each sampled client k reports F_k, the
loss of the model it received on its own training data before training (`loss_before`,
asked for in the fit config); with w the global model and w_k the client's model:

    Delta_k = L (w - w_k)
    h_k     = q F_k^(q-1) ||Delta_k||^2 + L F_k^q
    w_new   = w - sum_k F_k^q Delta_k / sum_k h_k

(F_k + 1e-10 as in the official code, so F_k = 0 is defined for q < 1.) Two clients with
losses 0.1 and 5.0 at q = 1 contribute their updates in the ratio 1:50. Clients are
weighted by their loss, not their example count; the paper samples them in proportion
to their data size (`client-sampling='size'`). An update without a finite `loss_before`
>= 0 is left out of the round and logged. q-FFL trusts the reported loss as FedAvg trusts
`num_examples`: a client that over-reports it pulls the model towards its update.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from logging import WARNING

import numpy as np
from flwr.common import FitIns, FitRes, NDArrays, Parameters
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fl_app.schema import LayerSettings, Setting
from fl_app.wire import KEY_LOSS_BEFORE
from strategies.context import StrategyContext
from strategies.metrics import is_finite_number
from strategies.per_client import PerClientFigure
from strategies.spec import StrategySpec

LOSS_EPSILON = 1e-10  # added to every F_k, as the official code does
# A client's loss counts at most this x the round's lower median: a bound on a lie, far above
# the 50x losses q-FFL is meant to favour.
LOSS_CAP_FACTOR = 100.0

SETTINGS = [
    Setting("qffl-q", float, 0.2,
            "qfedavg (q-FFL): fairness exponent q; a client's update weighs its own loss to "
            "the power q (0: an unweighted average of the updates; the paper uses 1 to 15, "
            "and a larger q also damps the step, so it needs more rounds).", "strategy",
            low=0.0),
    Setting("qffl-lipschitz", float, 10.0,
            "qfedavg (q-FFL): Lipschitz estimate L of the loss's gradient, the paper's "
            "1/learning rate of the clients (10: SGD(0.1), the default model's).",
            "strategy", low=0.0, low_open=True),
]


def qffl_step(global_weights: NDArrays, client_weights: list[NDArrays], losses: list[float],
              q: float, lipschitz: float) -> NDArrays:
    """q-FedAvg's new global model from the clients' models and their losses at the global
    model (see the module doc; accumulates in float64, keeps each array's dtype). When the
    losses' powers overflow the step is not finite: the global model is kept (logged)."""
    base = [g.astype(np.float64) for g in global_weights]
    step = [np.zeros_like(g) for g in base]
    denominator = np.float64(0.0)
    with np.errstate(over="ignore", invalid="ignore"):  # numpy powers overflow to inf
        for weights, loss in zip(client_weights, losses):
            f = np.float64(loss + LOSS_EPSILON)
            delta = [lipschitz * (g - w.astype(np.float64)) for g, w in zip(base, weights)]
            squared_norm = sum(float(np.sum(np.square(d))) for d in delta)
            for total, d in zip(step, delta):
                total += f ** q * d
            denominator += q * f ** (q - 1) * squared_norm + lipschitz * f ** q
        if not np.isfinite(denominator) or not all(np.isfinite(s).all() for s in step):
            log(WARNING, "q-FFL: the step is not finite (the losses' powers overflow at "
                "q=%s): keeping the global model", q)
            return [np.array(g, copy=True) for g in global_weights]
        return [(g - s / denominator).astype(w.dtype)
                for g, s, w in zip(base, step, global_weights)]


class QFedAvg(PerClientFigure):
    """WeightedFedAvg's sampling and evaluation with q-FFL's aggregation (module doc), each
    client's loss at the global model its figure (`PerClientFigure`): it asks every sampled
    client for `loss_before` in the fit config.

    Args:
        q: the fairness exponent.
        lipschitz: the Lipschitz estimate L.
        **kwargs: those of `WeightedFedAvg`.
    """

    name = "q-FFL"
    requirement = f"finite {KEY_LOSS_BEFORE!r} >= 0"

    def __init__(self, *, q: float, lipschitz: float, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.q = q
        self.lipschitz = lipschitz

    def __repr__(self) -> str:
        return f"QFedAvg(q={self.q}, L={self.lipschitz}, accept_failures={self.accept_failures})"

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """As `PerClientFigure`, asking each client for its loss before training."""
        return [(client, FitIns(ins.parameters, {**ins.config, KEY_LOSS_BEFORE: True}))
                for client, ins in super().configure_fit(server_round, parameters,
                                                         client_manager)]

    def figure(self, fit_res: FitRes) -> float | None:
        """The client's `loss_before`: a finite number >= 0 (None otherwise)."""
        value = fit_res.metrics.get(KEY_LOSS_BEFORE)
        return float(value) if is_finite_number(value) and value >= 0 else None

    def step(self, global_weights: NDArrays, client_weights: list[NDArrays],
             figures: list[float], num_examples: list[int]) -> NDArrays:
        """`qffl_step` with the clients' losses (their example counts do not weigh), each
        capped at LOSS_CAP_FACTOR x the round's lower median loss: a client cannot make
        its own update the whole step by reporting a huge loss."""
        cap = LOSS_CAP_FACTOR * max(statistics.median_low(figures), LOSS_EPSILON)
        return qffl_step(global_weights, client_weights, [min(f, cap) for f in figures],
                         self.q, self.lipschitz)


@dataclass(frozen=True)
class QfflSettings(LayerSettings):
    """q-FFL's run-config keys (this module's `SETTINGS`)."""

    qffl_q: float
    qffl_lipschitz: float


def build(ctx: StrategyContext) -> Strategy:
    """Registry factory for `strategy=qfedavg`."""
    settings = QfflSettings.from_config(ctx.cfg)
    return QFedAvg(q=settings.qffl_q, lipschitz=settings.qffl_lipschitz,
                   **ctx.common_kwargs())


SPECS = [StrategySpec("qfedavg", build, needs="scales each update by its client's loss",
                      sums=False, linear=False, takes_private_average=False)]
