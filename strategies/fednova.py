"""FedNova: normalised averaging for clients that do different amounts of local work.

Wang, Liu, Liang, Joshi and Poor, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization" (NeurIPS 2020). FedAvg averages the clients' models;
a client that took more local steps moved further and pulls the average towards its own
objective, so the global model converges to the optimum of a mis-weighted objective. FedNova
averages each client's update divided by its number of local steps tau_i, then takes
tau_eff = sum_i p_i tau_i steps along that average (p_i = n_i / n, the example weights):

    x_new = x - tau_eff * sum_i p_i (x - x_i) / tau_i

This is the paper's rule for plain local SGD (its a_i = [1, ..., 1], ||a_i||_1 = tau_i),
which is what the app's compiled optimizer does unless the model was compiled with
momentum or an adaptive optimizer. With equal tau_i it is exactly FedAvg. The clients
report tau_i as `local_steps` in their fit metrics; an update without a whole number of
steps >= 1 is left out of the round and logged. Under `round-time-budget` a client also
reports `lr_scale`, the factor b'/b its learning rate was scaled by with its batch size
(`fl_app.client.adaptive_work`): the paper assumes one rate for all, and a step at s
times the rate moves as far as s steps at it (linear scaling), so tau_i = local_steps ×
lr_scale, the steps at the base rate (an `lr_scale` outside [1/4, 4] leaves the update
out).

One departure from the paper: a client's update is scaled up by tau_eff / tau_i at most
`MAX_EXTRAPOLATION` (4) times, i.e. tau_i counts as at least tau_eff / 4. The paper's rule
assumes the clients' steps are of one order; under `round-time-budget` with 10x slower
stragglers they are not (measured: tau from 10 to 1,000), and a straggler's few noisy
steps taken 45 times over made the model diverge (accuracy 0.75 at round 2, 0.10 at
round 3 on digits). With the bound the same run reaches 0.96 by round 5. Below the bound
(every client within 4x of tau_eff, and so equal tau_i) the rule is the paper's exactly. The bound
also limits what a client that under-reports its steps gains: its update counts at most 4 times, as
FedAvg trusts `num_examples` and FedNova trusts the reported figures.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.common import FitRes, NDArrays
from flwr.server.strategy import Strategy

from fl_app.wire import KEY_LOCAL_STEPS, KEY_LR_SCALE, MAX_LR_SCALE
from strategies.context import StrategyContext
from strategies.per_client import PerClientFigure
from strategies.spec import StrategySpec
from strategies.weighted_fedavg import weighted_average

MAX_EXTRAPOLATION = 4.0  # a client's update is scaled up by tau_eff / tau_i at most this


def normalized_average(global_weights: NDArrays, client_weights: list[NDArrays],
                       num_examples: list[int], steps: list[float]) -> NDArrays:
    """FedNova's new global model from the clients' models, example counts and local steps,
    each tau_i counted as at least tau_eff / `MAX_EXTRAPOLATION` (accumulates in float64,
    keeps each array's dtype)."""
    total = float(sum(num_examples))
    tau_eff = sum(n / total * tau for n, tau in zip(num_examples, steps))
    steps = [max(tau, tau_eff / MAX_EXTRAPOLATION) for tau in steps]
    directions = [[(g.astype(np.float64) - w.astype(np.float64)) / tau
                   for g, w in zip(global_weights, weights)]
                  for weights, tau in zip(client_weights, steps)]
    mean_direction = weighted_average(directions, [float(n) for n in num_examples])
    return [(g.astype(np.float64) - tau_eff * d).astype(g.dtype)
            for g, d in zip(global_weights, mean_direction)]


def _number(value: object) -> float | None:
    """`value` as a finite float, None if it is not a finite int or float."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


class FedNova(PerClientFigure):
    """WeightedFedAvg's sampling and evaluation with FedNova's normalised averaging of the
    updates against the global model sent (see the module doc), each client's local steps
    its figure (`PerClientFigure`). Arguments: those of `WeightedFedAvg`.
    """

    name = "FedNova"
    requirement = (f"whole number >= 1 of {KEY_LOCAL_STEPS!r} (and {KEY_LR_SCALE!r}, if "
                   f"sent, within [1/{MAX_LR_SCALE:g}, {MAX_LR_SCALE:g}])")

    def __repr__(self) -> str:
        return f"FedNova(accept_failures={self.accept_failures})"

    def figure(self, fit_res: FitRes) -> float | None:
        """The client's tau: its local steps, a whole number >= 1, times its `lr_scale`
        (1 if not sent; within [1/4, 4]); None when either is out of bounds."""
        steps = _number(fit_res.metrics.get(KEY_LOCAL_STEPS))
        scale = _number(fit_res.metrics.get(KEY_LR_SCALE, 1.0))
        if steps is None or steps < 1 or not steps.is_integer() or scale is None \
                or not 1 / MAX_LR_SCALE <= scale <= MAX_LR_SCALE:
            return None
        return steps * scale

    def step(self, global_weights: NDArrays, client_weights: list[NDArrays],
             figures: list[float], num_examples: list[int]) -> NDArrays:
        """`normalized_average` with the clients' local steps."""
        return normalized_average(global_weights, client_weights, num_examples, figures)


def build(ctx: StrategyContext) -> Strategy:
    """Registry factory for `strategy=fednova`."""
    return FedNova(**ctx.common_kwargs())


SPECS = [StrategySpec("fednova", build, needs="scales each update by its client's local steps",
                      sums=False, linear=False, takes_private_average=False)]
SETTINGS: list = []  # FedNova uses only the shared sampling keys (strategies.context)
