"""Distributed DP: the clients clip and noise their own updates; the server sees only the sum.

Under secure aggregation (`secure-aggregation=secagg+`) `strategy=dp-client-fixed` runs
`DistributedDPFixedClipping`, the setting of Kairouz et al. (2021), "The Distributed
Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation", with
Gaussian noise and SecAgg+'s fine quantization in place of the discrete Gaussian. Each
round, for the k clients sampled:

1. each client clips its update to L2 norm C (as for `dp-client-fixed`), adds Gaussian
   noise of std z·C/√k drawn from OS entropy (`dp_noise_std` in the fit config), reports
   `num_examples=1` and no metrics, and masks the result (SecAgg+);
2. the server unmasks only the sum S of the k' answering clients' noised updates: its noise
   has std z·C·√(k'/k). For the k − k' clients that dropped out, the server adds the
   missing noise, std z·C·√((k − k')/k), so the sum always carries noise of std z·C;
3. the released average is S/m (m the DP denominator, as in `strategies.dp`), the round is
   charged to the same accountant with the same noise multiplier z, and the inner strategy
   gets the release as in `strategies.dp`.

Trust model (honest-but-curious server, honest clients): the released model is (ε, δ)-DP
exactly as accounted. The server itself learns only S: when every sampled client answers,
S already carries the full noise, so the guarantee holds against the server too; with
dropouts, against the server it holds with noise multiplier z·√(k'/k). Clients that collude
with the server subtract their own noise: with c of them it is z·√((k' − c)/k). Clients are
trusted to clip and to add their noise; one that does not weakens only its own guarantee
(its update is still bounded by nothing, so a malicious client can still poison the model).
"""

from __future__ import annotations

import math
from logging import INFO
from typing import Any

import numpy as np
from flwr.common import FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fl_app.protocol.clipping import model_update
from fl_app.schema import Setting
from fl_app.wire import KEY_DP_NOISE_STD
from strategies.context import StrategyContext
from strategies.dp import ACCOUNTING, DPFixedClipping, DPSettings, dp_kwargs
from strategies.spec import StrategySpec
from strategies.validation import NUM_REJECTED


class DistributedDPFixedClipping(DPFixedClipping):
    """Fixed-clipping DP whose noise the clients add, for secure aggregation (module doc).

    `aggregate_fit` expects what a secure aggregation round hands a strategy: every result
    carries the same aggregate, the plain mean of the answering clients' noised, clipped
    updates (unit weights) added to the global model. Takes `DPFixedClipping`'s arguments
    less `client_side` (always True).
    """

    def __init__(self, inner: Strategy, **kwargs: Any) -> None:
        super().__init__(inner, **{**kwargs, "client_side": True})

    def client_noise_std(self, num_sampled: int) -> float:
        """The std of the noise each of `num_sampled` clients adds: z·C/√k."""
        return self.noise_multiplier * self.clip_norm / math.sqrt(num_sampled)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """As `DPFixedClipping`, plus each client's share of the noise in its fit config."""
        instructions = super().configure_fit(server_round, parameters, client_manager)
        if instructions:  # sent even when 0: it also makes the clients weigh themselves 1
            std = self.client_noise_std(len(instructions))
            for _, fit_ins in instructions:
                fit_ins.config = {**fit_ins.config, KEY_DP_NOISE_STD: std}
        return instructions

    def open_fit_stream(self, server_round: int) -> None:
        """None: the round's one reply is the SecAgg+ sum, aggregated whole."""
        return None

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException],
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Turn the secure mean back into the sum, add the dropped clients' missing noise,
        divide by m, account the release and hand it to the inner strategy."""
        plan = self._plan
        if plan is None:
            return None, {}
        kept = self._from_sample(server_round, results, plan)
        total = [np.zeros(ref.shape) for ref in plan.reference]
        if kept:
            mean = model_update(parameters_to_ndarrays(kept[0][1].parameters), plan.reference)
            total = [layer * len(kept) for layer in mean]
        sampled = len(plan.sampled)
        missing_std = self.client_noise_std(sampled) * math.sqrt(sampled - len(kept))
        rng = self._noise_rng()
        noised = [(t + rng.normal(0.0, missing_std, t.shape)) / plan.denominator for t in total]
        self.accountant.record(plan.event)
        std = self.noise_multiplier * plan.clip_norm / plan.denominator
        log(INFO, "distributed DP: sum of %s of %s clients' noised updates, m=%g, C=%.4g, "
            "noise std %.4g (%.4g added by the server for dropouts)", len(kept), sampled,
            plan.denominator, plan.clip_norm, std, missing_std / plan.denominator)
        return self._post_process(server_round, plan, noised, {
            NUM_REJECTED: 0, "dp_clip_norm": plan.clip_norm, "dp_noise_std": std,
            "dp_server_noise_std": missing_std / plan.denominator})


def _client_fixed(inner: Strategy, ctx: StrategyContext) -> DPFixedClipping:
    """dp-client-fixed: the clients clip; the server noises the plaintext average, or, under
    secure aggregation, each client noises its own clipped update (this module's class)."""
    settings = DPSettings.from_config(ctx.cfg)
    kwargs = dp_kwargs(settings, client_side=True)
    if settings.secure_aggregation != "none":
        return DistributedDPFixedClipping(inner, **kwargs)
    return DPFixedClipping(inner, **kwargs)


SETTINGS: list[Setting] = []  # its keys are dp's (`DPSettings`) and secure's
SPECS = [
    StrategySpec("dp-client-fixed", _client_fixed, wrapper=True,
                 needs=f"noises the plaintext average on the server, and {ACCOUNTING}",
                 sums=True, linear=False, takes_private_average=False),
]
