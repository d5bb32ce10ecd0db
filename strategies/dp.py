"""Central differential privacy: clip each client's update, average, add Gaussian noise.

The wrappers take any inner strategy (`dp-inner`, default `weighted-fedavg`). Each round:

1. invalid updates are rejected by `ValidatedStrategy`, which the registry puts in front
   of every strategy (for DP with no `min-fit-clients` minimum);
2. each client's update Δᵢ = wᵢ − w_global is clipped to L2 norm C over all layers
   (`fl_app.protocol.clipping`) — on the server (`dp-fixed`, `dp-adaptive`), or by the client
   itself, which receives C in the round's fit config (`dp-client-fixed`,
   `dp-client-adaptive`; the server re-clips as a safeguard, a no-op for honest clients);
3. the clipped updates are averaged with *equal weights* over a fixed denominator m (the
   number of clients sampled; for Poisson sampling the expected number q·N): clients that
   fail or are rejected count as a zero update, and the round is released whatever they
   did (skipping it would reveal, un-noised, that a client failed; hence `accept-failures`
   must stay on and `min-fit-clients` does not hold a DP round back). Client-reported
   `num_examples` is ignored: weighting by it would let one client's weight, and so the
   sensitivity, grow without bound;
4. Gaussian noise of std z·C/m is added to the average (z = `noise-multiplier`);
5. the inner strategy receives this privatized model in place of every accepted client's
   parameters, each with `num_examples=1` and no client metrics, so whatever it computes
   (FedAvg, a server optimizer such as FedAdam, ...) is post-processing of the DP release.
   Robust aggregators (median, Krum) then see identical inputs and add nothing. Per-client
   fit metrics (training loss, ...) are not released; the round's metrics carry
   `dp_clip_norm`, `dp_noise_std` and, for adaptive clipping, the noised
   `dp_unclipped_fraction`.

Adaptive clipping (Andrew et al., 2021, "Differentially Private Learning with Adaptive
Clipping") moves C towards the γ-quantile of the update norms: with b̃ the noised
fraction of updates not clipped (count noise std σ_b = `clipped-count-stddev`, by
default max(m/20, z)), C ← C·exp(−η(b̃ − γ)). The count is centred, Σ(bᵢ − ½), so one
client moves it by at most ½ (under add/remove adjacency, Poisson sampling; under
replace-one both queries' sensitivities double together), and the update noise
multiplier z_Δ is raised so that the two Gaussian queries together equal one with
multiplier z: z⁻² = z_Δ⁻² + (2σ_b)⁻²; the accountant charges z per round (the tests
check this against dp-accounting composing both queries).

The noise and the DP client sample are drawn from a fresh generator seeded by OS entropy
for every use, kept nowhere and never persisted (a checkpoint holding a generator's state
would let its reader step it back and subtract a round's noise): the run config (and so
`seed`) reaches every client, and noise or a sample anyone can recompute protects nothing.
`dp-noise-seed` makes them reproducible for experiments only (then their state is
checkpointed, for an exact replay). With Poisson sampling, an empty sample skips the round
(Flower cancels a round without clients); that happens with probability (1 − q)^N, and a
configuration where that is not far below δ is refused (`accounting.check_empty_sample`).

Every round's ε at δ comes from `strategies.accounting`; the run stops before a round
that would exceed `max-epsilon`, and `configure_fit` refuses such a round itself, so the
budget also holds under Flower's plain server loop. Distributed evaluation metrics are
not covered by the guarantee, so it is off under DP unless `dp-distributed-evaluation` is
set; every round's privacy record lists what it does not cover (`NOT_COVERED`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property, partial
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.common import (
    Code,
    EvaluateIns,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fl_app.protocol.clipping import clip_update, model_update
from fl_app.schema import ConfigError, LayerSettings, Setting
from fl_app.schema import Scalar as ConfigValue
from fl_app.wire import KEY_CLIPPING_NORM, KEY_NORM_BIT
from strategies.accounting import ACCOUNTANTS, SAMPLINGS, PrivacyAccountant, RoundEvent
from strategies.context import StrategyContext
from strategies.decoding import decode
from strategies.dp_sampling import WAIT_TIMEOUT, DPSampling
from strategies.spec import StrategySpec
from strategies.validation import NUM_REJECTED
from strategies.weighted_fedavg import sample_size
from strategies.wrapper import StrategyWrapper

CLIENT_CLIP_TOLERANCE = 1e-5  # relative: float32 rounding of a client-clipped update
# What a round's record in history.json holds outside the guarantee, which covers the
# released model and everything computed from it alone (centralized evaluation, the
# final model): counts of sampled, answering, failed, rejected and capped clients, the failures,
# distributed evaluation, the round's wall time and its bytes on the wire (they count the
# replies). The clients' per-client reports (`fit.data_quality`, `fit.timing`) are not
# recorded under DP at all (`fl_app.server.runner.FederatedServer`).
NOT_COVERED = ("fit.num_sampled", "fit.num_clients", "fit.num_failures", "fit.failures",
               "fit.num_rejected", "fit.num_capped", "distributed", "seconds", "bytes")


SETTINGS = [
    Setting("clipping-norm", float, 1.0,
            "DP: L2 clip norm C of each client's update, all layers together (adaptive "
            "clipping: the initial C).", "privacy", low=0.0, low_open=True),
    Setting("noise-multiplier", float, 1.0,
            "DP: noise multiplier z; the averaged update gets Gaussian noise of std z*C/m "
            "(adaptive clipping: z covers the update and clipped-count noise together).",
            "privacy", low=0.0),
    Setting("dp-sampling", str, "fixed",
            "DP: client sampling: 'fixed' (fraction-fit x N clients without replacement) or "
            "'poisson' (each client independently with probability fraction-fit).",
            "privacy", choices=SAMPLINGS),
    Setting("accountant", str, "rdp",
            "DP: privacy accountant from dp-accounting ('pld' needs dp-sampling='poisson').",
            "privacy", choices=ACCOUNTANTS),
    Setting("target-delta", float, 0.0,
            "DP: delta at which epsilon is reported, below 1/N for N clients (0: min(1e-5, "
            "1/(10N))).",
            "privacy", low=0.0, high=1.0, high_open=True),
    Setting("max-epsilon", float, 0.0,
            "DP: privacy budget; the run stops before a round that would exceed it "
            "(0: no budget).", "privacy", low=0.0),
    Setting("target-clipped-quantile", float, 0.5,
            "Adaptive clipping: target fraction of updates left unclipped (C tracks this "
            "quantile of the update norms).", "privacy", low=0.0, high=1.0),
    Setting("clip-norm-lr", float, 0.2,
            "Adaptive clipping: learning rate of the geometric clip-norm update.", "privacy",
            low=0.0, low_open=True),
    Setting("dp-noise-seed", int, 0,
            "DP: 0 draws the noise and the DP client sample from OS entropy, as the guarantee "
            "requires; a positive seed makes them reproducible, for experiments only (the run "
            "config reaches every client, so seeded noise is no secret and epsilon does not "
            "hold).", "privacy", low=0),
    Setting("dp-distributed-evaluation", bool, False,
            "DP: run distributed evaluation; its metrics (client losses and accuracies) are "
            "released un-noised next to epsilon, outside the guarantee (off: none).",
            "privacy"),
    Setting("clipped-count-stddev", float, 0.0,
            "Adaptive clipping: std of the noise on the count of unclipped updates "
            "(0: max(m/20, noise-multiplier) for m sampled clients; Andrew et al. use "
            "m/20).", "privacy", low=0.0),
]


def check_config(values: Mapping[str, ConfigValue]) -> None:
    """Refuse settings a DP strategy cannot honour without leaking un-noised information."""
    strategy = values["strategy"]
    if not str(strategy).startswith("dp-"):
        return
    if not values["accept-failures"]:
        raise ConfigError(
            f"run-config key 'accept-failures' must be true with strategy='{strategy}': a DP "
            "round is released whatever its clients did (a failed client counts as a zero "
            "update); skipping it would reveal, un-noised, that a client failed")
    if values["outlier-norm-factor"]:
        raise ConfigError(
            f"run-config key 'outlier-norm-factor' must be 0 with strategy='{strategy}': "
            "rejecting an update for its norm relative to the other clients' depends on their "
            "data outside the privacy accounting; clipping already bounds every update")


def split_noise_multiplier(total: float, count_stddev: float) -> float:
    """The update's noise multiplier z_Δ such that it and the clipped-count query (std
    σ_b, sensitivity 1/2) together equal one Gaussian query with multiplier `total`."""
    if total == 0:
        return 0.0
    if 2 * count_stddev <= total:
        raise ConfigError(
            f"adaptive clipping with noise-multiplier={total:g} needs clipped-count-stddev "
            f"> {total / 2:g} (got {count_stddev:g}): raise clipped-count-stddev "
            "(0 picks a valid value) or lower noise-multiplier")
    return (total ** -2 - (2 * count_stddev) ** -2) ** -0.5


@dataclass
class _RoundPlan:
    """What `configure_fit` fixed for the round that `aggregate_fit` completes."""

    reference: NDArrays  # the global model sent
    denominator: float  # m: clients sampled, or expected (q·N) under Poisson sampling
    event: RoundEvent  # what the accountant records if the round releases a model
    clip_norm: float  # C for this round
    sampled: list[ClientProxy]  # the clients sent the round, whatever they answer

    @cached_property
    def sampled_cids(self) -> frozenset[str]:
        """The ids of `sampled` (looked up once per reply)."""
        return frozenset(proxy.cid for proxy in self.sampled)


class DPFixedClipping(StrategyWrapper):
    """Central DP with a fixed clip norm around any inner strategy (see the module doc).

    `client_side=True`: clients clip their own updates (C is sent in the fit config under
    Flower's `clipping_norm` key) and the server only averages and adds noise.
    Noise and the client sample are drawn from a fresh generator seeded by OS entropy for
    every use, or from generators seeded by `noise_seed` > 0 (reproducible, not private).
    The clip norm, the accountant's ledger and, only when seeded, the generators' states
    are part of `get_state()`.
    """

    def __init__(self, inner: Strategy, *, noise_multiplier: float, clipping_norm: float,
                 accountant: PrivacyAccountant | None = None, noise_seed: int = 0,
                 client_side: bool = False,
                 max_epsilon: float = 0.0, fraction_fit: float = 1.0,
                 min_fit_clients: int = 1, min_available_clients: int = 1,
                 distributed_evaluation: bool = False) -> None:
        super().__init__(inner)
        if noise_multiplier < 0 or clipping_norm <= 0:
            raise ConfigError(f"need noise-multiplier >= 0 and clipping-norm > 0, got "
                              f"{noise_multiplier} and {clipping_norm}")
        self.noise_multiplier = noise_multiplier
        self.clip_norm = clipping_norm
        self.accountant = accountant or PrivacyAccountant()
        self.client_side = client_side
        self.max_epsilon = max_epsilon
        self.fraction_fit = fraction_fit
        self.min_fit_clients = min_fit_clients
        self.min_available_clients = max(1, min_available_clients)
        self.distributed_evaluation = distributed_evaluation
        if distributed_evaluation:
            log(WARNING, "dp-distributed-evaluation=true: the clients' evaluation metrics are "
                "released un-noised next to epsilon, outside the privacy guarantee")
        # Seeded generators exist only for experiments (dp-noise-seed); otherwise None, and
        # every draw comes from a fresh OS-entropy generator (`_noise_rng`, `_sample_rng`).
        self._seeded_noise = np.random.default_rng([noise_seed, 0xD9]) if noise_seed else None
        self._seeded_sampling = np.random.default_rng([noise_seed, 0x5A]) if noise_seed else None
        if noise_seed:
            log(WARNING, "dp-noise-seed=%s: the DP noise and client sample are reproducible "
                "by anyone who knows the run config; use it for experiments, not privacy",
                noise_seed)
        self._plan: _RoundPlan | None = None
        if noise_multiplier == 0:
            log(WARNING, "noise-multiplier=0: updates are clipped but not noised; the run has "
                "no privacy guarantee (epsilon is infinite)")

    def __repr__(self) -> str:
        side = "client" if self.client_side else "server"
        return (f"{type(self).__name__}({self.inner!r}, {side}-side, z={self.noise_multiplier},"
                f" C={self.clip_norm:.4g}, {self.accountant.kind}/{self.accountant.sampling})")

    def _noise_rng(self) -> np.random.Generator:
        """The generator for this draw of noise: seeded for experiments, else fresh."""
        seeded = self._seeded_noise
        return seeded if seeded is not None else np.random.default_rng()

    def _sample_rng(self) -> np.random.Generator:
        """The generator for this round's client sample: seeded for experiments, else fresh."""
        seeded = self._seeded_sampling
        return seeded if seeded is not None else np.random.default_rng()

    # ---- calibration (adaptive clipping overrides these)
    def update_noise_multiplier(self, denominator: float) -> float:
        """The noise multiplier of the averaged update (std = this · C / m)."""
        return self.noise_multiplier

    def _clipped(self, proxy: ClientProxy, fit_res: FitRes, norm: float, clip_norm: float,
                 server_round: int) -> bool | str:
        """Whether the client's update was clipped, or why the update must be rejected."""
        if not self.client_side:
            return norm > clip_norm
        if norm > clip_norm * (1 + CLIENT_CLIP_TOLERANCE):
            log(WARNING, "round %s: client %s sent an update above the clip norm %.6g: "
                "clipped on the server", server_round, proxy.cid, clip_norm)
            return True
        return bool(fit_res.metrics.get(KEY_NORM_BIT, norm > clip_norm))

    # ---- the Strategy contract
    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Let the inner strategy sample through our secret `DPSampling` view; fix m, C and
        the round's privacy event; send C to the clients for client-side clipping."""
        self._plan = None
        poisson = self.accountant.sampling == "poisson"
        sampler = DPSampling(client_manager, self._sample_rng(),
                             self.accountant.poisson_rate if poisson else None)
        instructions = self.inner.configure_fit(server_round, parameters, sampler)
        if not instructions:
            return []
        population = client_manager.num_available()
        event = self.accountant.event(self.noise_multiplier, len(instructions), population)
        if not self._allows(event):
            log(WARNING, "round %s: not started, it would exceed max-epsilon=%g",
                server_round, self.max_epsilon)
            return []
        denominator = (len(instructions) if self.accountant.sampling == "fixed"
                       else self.accountant.poisson_rate * population)
        self.update_noise_multiplier(denominator)  # fail before training if uncalibratable
        self._plan = _RoundPlan(parameters_to_ndarrays(parameters), denominator, event,
                                self.clip_norm, [proxy for proxy, _ in instructions])
        if self.client_side:
            for _, fit_ins in instructions:
                fit_ins.config = {**fit_ins.config, KEY_CLIPPING_NORM: float(self.clip_norm)}
        return instructions

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        """No distributed evaluation (its metrics are not private) unless it was asked for."""
        if not self.distributed_evaluation:
            return []
        return self.inner.configure_evaluate(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Clip the (validated) updates, average them with equal weights, add noise, account
        the release, and hand the privatized model to the inner strategy. Every configured
        round is released, whatever the clients did: failed and rejected ones count as zero.
        The same `ClippedSum` a streamed round feeds (`open_fit_stream`)."""
        stream = self.open_fit_stream(server_round)
        if stream is None:
            return None, {}
        for proxy, fit_res in results:
            stream.add(proxy, fit_res)
        return stream.finish(failures)

    def open_fit_stream(self, server_round: int) -> ClippedSum | None:
        """The round's `ClippedSum`, to which a server loop may add each reply as it
        arrives (`strategies.protocols.StreamsFit`); None when no round was configured."""
        return None if self._plan is None else ClippedSum(self, server_round, self._plan)

    def _post_process(self, server_round: int, plan: _RoundPlan, noised: NDArrays,
                      metrics: dict[str, Scalar]) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Hand the released (noised average) update, as weights, to the inner strategy."""
        privatized = ndarrays_to_parameters(
            [(ref.astype(np.float64) + delta).astype(ref.dtype)
             for ref, delta in zip(plan.reference, noised)])
        # One copy per sampled client, failed or not (their zero updates are in the average):
        # the inner strategy's own minimum-client and failure rules then never hold the
        # release back, and a stateful one (FedAdam) steps every released round.
        inner_results = [(proxy, FitRes(status=Status(Code.OK, ""), parameters=privatized,
                                        num_examples=1, metrics={})) for proxy in plan.sampled]
        parameters, inner_metrics = self.inner.aggregate_fit(server_round, inner_results, [])
        if parameters is None:  # an inner strategy that declines still cannot veto the release
            log(WARNING, "round %s: %r returned no model; the DP release is applied as is",
                server_round, self.inner)
            parameters = privatized
        return parameters, {**inner_metrics, **metrics, **self._epsilon_metrics(server_round)}

    def _epsilon_metrics(self, server_round: int) -> dict[str, Scalar]:
        """ε and δ so far as fit metrics (`dp_epsilon`, `dp_delta`), so that they reach
        Flower's `History` as every other round metric does (none without a guarantee)."""
        report = self.privacy_report(server_round)
        return {} if report is None else {"dp_epsilon": float(report["epsilon"]),
                                          "dp_delta": float(report["delta"])}

    @staticmethod
    def _from_sample(server_round: int, results: list[tuple[ClientProxy, FitRes]],
                     plan: _RoundPlan) -> list[tuple[ClientProxy, FitRes]]:
        """The results of clients in the round's sample, one each; others dropped, logged
        (an extra or repeated update would raise the sensitivity the noise assumes)."""
        seen: set[str] = set()
        return [(proxy, fit_res) for proxy, fit_res in results
                if in_sample(server_round, proxy, plan, seen)]

    def _release(self, plan: _RoundPlan, total: NDArrays,
                 bits: list[bool]) -> tuple[NDArrays, dict[str, Scalar]]:
        """The noised average update, from the sum of the clipped updates (`bits`: one per
        update, whether it was clipped); records the round with the accountant."""
        std = self.update_noise_multiplier(plan.denominator) * plan.clip_norm / plan.denominator
        rng = self._noise_rng()
        noised = [t / plan.denominator + rng.normal(0.0, std, t.shape) for t in total]
        self.accountant.record(plan.event)
        log(INFO, "DP: averaged %s clipped update(s) over m=%g, C=%.4g, noise std %.4g",
            len(bits), plan.denominator, plan.clip_norm, std)
        return noised, {"dp_clip_norm": plan.clip_norm, "dp_noise_std": std}

    # ---- privacy budget and report (strategies.protocols.PrivacyAccounting)
    def _allows(self, event: RoundEvent) -> bool:
        self.accountant.fix_delta(event.population)
        return not self.max_epsilon or self.accountant.epsilon(event) <= self.max_epsilon

    def budget_allows(self, server_round: int, client_manager: ClientManager) -> bool:
        """False if the next round would exceed the budget, among the clients it samples
        from: like the round's sampling, this first waits until `min_available_clients` are
        connected (a resumed run may start before any node has), and with no client even
        then the population is unknown and the round is not allowed. True without a budget."""
        if not self.max_epsilon:
            return True
        client_manager.wait_for(self.min_available_clients, WAIT_TIMEOUT)
        population = client_manager.num_available()
        if population == 0:
            log(WARNING, "round %s: no client connected, so the privacy budget cannot be "
                "checked: not started", server_round)
            return False
        m = min(population, sample_size(population, self.fraction_fit, self.min_fit_clients))
        return self._allows(self.accountant.event(self.noise_multiplier, m, population))

    def privacy_report(self, server_round: int) -> dict[str, Any] | None:
        """ε and δ over the rounds released so far, the neighbouring relation they hold
        under, and the parts of a round's record the guarantee does not cover (None
        without noise or before δ is set)."""
        if self.noise_multiplier == 0 or self.accountant.delta is None:
            return None
        return {"epsilon": self.accountant.epsilon(), "delta": self.accountant.delta,
                "relation": self.accountant.relation, "not_covered": list(NOT_COVERED)}

    # ---- checkpoint state
    def get_state(self) -> dict[str, Any]:
        """The inner strategy's state plus ours under "dp": C, the ledger and, with
        `noise_seed` only, the seeded generators' states (secret randomness never is)."""
        own: dict[str, Any] = {"clip_norm": self.clip_norm,
                               "accountant": self.accountant.get_state()}
        if self._seeded_noise is not None and self._seeded_sampling is not None:
            own["rng"] = self._seeded_noise.bit_generator.state
            own["sampling_rng"] = self._seeded_sampling.bit_generator.state
        return {**super().get_state(), "dp": own}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what `get_state` returned (a fresh, unseeded strategy keeps drawing from
        OS entropy: a resumed run never reuses the noise of a round it replays)."""
        own = state["dp"]
        self.clip_norm = float(own["clip_norm"])
        if self._seeded_noise is not None and self._seeded_sampling is not None:
            self._seeded_noise.bit_generator.state = own["rng"]
            self._seeded_sampling.bit_generator.state = own["sampling_rng"]
        self.accountant.set_state(own["accountant"])
        super().set_state(state)

    def ledger(self) -> dict[str, Any]:
        """The accountant's ledger: every round charged so far (JSON-serialisable)."""
        return self.accountant.get_state()

    def restore_ledger(self, ledger: dict[str, Any]) -> None:
        """Adopt a ledger that charged more rounds than the restored one: rounds charged
        (and maybe released) after the last checkpoint stay charged when they are
        replayed."""
        extra = len(ledger["rounds"]) - len(self.accountant.rounds)
        if extra > 0:
            log(WARNING, "DP: %s round(s) were charged after the last checkpoint (a crash "
                "after their release); they stay charged, and the replay is charged again",
                extra)
            self.accountant.set_state(ledger)


def in_sample(server_round: int, proxy: ClientProxy, plan: _RoundPlan, seen: set[str]) -> bool:
    """Whether the reply of `proxy` counts: from a client in the round's sample, and its
    first (`seen`: the clients counted so far, updated); else dropped, logged (an extra or
    repeated update would raise the sensitivity the noise assumes)."""
    if proxy.cid in seen or proxy.cid not in plan.sampled_cids:
        why = "a repeat" if proxy.cid in seen else "not in this round's sample"
        log(WARNING, "round %s: dropped an update from client %s: %s", server_round,
            proxy.cid, why)
        return False
    seen.add(proxy.cid)
    return True


class ClippedSum:
    """One DP round's clipped updates summed (float64) as they are added: what
    `DPFixedClipping.aggregate_fit` computes, reply by reply (`strategies.protocols.
    FitStream`), so a server loop may drop each reply once it is added. Each update is
    decoded without a copy, clipped (`fl_app.protocol.clipping`) and added in the order the
    replies come; `finish` noises the average, accounts the release and post-processes it.
    """

    def __init__(self, owner: DPFixedClipping, server_round: int, plan: _RoundPlan) -> None:
        self.owner = owner
        self.server_round = server_round
        self.plan = plan
        self.total: NDArrays = [np.zeros(ref.shape) for ref in plan.reference]
        self.bits: list[bool] = []  # per summed update: whether it was clipped
        self.rejected = 0
        self._seen: set[str] = set()

    def add(self, proxy: ClientProxy, fit_res: FitRes) -> None:
        """Clip one (validated) reply's update and add it to the sum, unless it is not
        counted (`in_sample`) or `DPFixedClipping._clipped` rejects it (logged)."""
        plan, server_round = self.plan, self.server_round
        if not in_sample(server_round, proxy, plan, self._seen):
            return
        update, norm = clip_update(model_update(decode(fit_res.parameters), plan.reference),
                                   plan.clip_norm)
        bit = self.owner._clipped(proxy, fit_res, norm, plan.clip_norm, server_round)
        if isinstance(bit, str):
            log(WARNING, "round %s: rejected update from client %s: %s", server_round,
                proxy.cid, bit)
            self.rejected += 1
            return
        for acc, layer in zip(self.total, update):
            acc += layer
        self.bits.append(bit)

    def skip(self, proxy: ClientProxy) -> None:
        """Nothing to do: a failed client counts as a zero update."""

    def finish(
        self, failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The round's release (`DPFixedClipping.aggregate_fit`'s answer)."""
        owner = self.owner
        if len(self.bits) < owner.min_fit_clients:
            log(WARNING, "round %s: only %s valid update(s), fewer than min-fit-clients=%s: "
                "released all the same (a DP round is never held back)", self.server_round,
                len(self.bits), owner.min_fit_clients)
        noised, dp_metrics = owner._release(self.plan, self.total, self.bits)
        return owner._post_process(self.server_round, self.plan, noised,
                                   {NUM_REJECTED: self.rejected, **dp_metrics})


def centred_unclipped_count(clipped: list[bool]) -> float:
    """Σ(bᵢ − ½) over the clients' bits bᵢ = 1 when not clipped: adding or removing one
    client moves it by exactly ½, the sensitivity the noise split assumes."""
    return sum(0.5 - bit for bit in clipped)


class DPAdaptiveClipping(DPFixedClipping):
    """Central DP with adaptive clipping (Andrew et al., 2021; see the module doc).

    After each release C ← C·exp(−η(b̃ − γ)), b̃ the noised fraction of the m sampled
    clients whose update was not clipped. With `client_side=True` each client reports
    whether it clipped (`norm_bit` fit metric, as Flower's `adaptiveclipping_mod` does);
    an update without it is rejected.
    """

    def __init__(self, inner: Strategy, *, target_quantile: float = 0.5,
                 clip_norm_lr: float = 0.2, clipped_count_stddev: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(inner, **kwargs)
        self.target_quantile = target_quantile
        self.clip_norm_lr = clip_norm_lr
        self.clipped_count_stddev = clipped_count_stddev
        if clipped_count_stddev:
            split_noise_multiplier(self.noise_multiplier, clipped_count_stddev)

    def count_stddev(self, denominator: float) -> float:
        """σ_b: the configured value, else max(m/20, z) (0 without noise).

        m/20 is Andrew et al.'s choice for many clients; the floor z keeps the count's
        share of the noise budget, (2σ_b)⁻² of z⁻², at most a quarter for few clients.
        """
        if self.clipped_count_stddev or self.noise_multiplier == 0:
            return self.clipped_count_stddev
        return max(denominator / 20, self.noise_multiplier)

    def update_noise_multiplier(self, denominator: float) -> float:
        """z_Δ: the part of the noise budget z left after the clipped-count query."""
        return split_noise_multiplier(self.noise_multiplier, self.count_stddev(denominator))

    def _clipped(self, proxy: ClientProxy, fit_res: FitRes, norm: float, clip_norm: float,
                 server_round: int) -> bool | str:
        if self.client_side and not isinstance(fit_res.metrics.get(KEY_NORM_BIT), (bool, int)):
            return (f"no '{KEY_NORM_BIT}' fit metric: client-side adaptive clipping needs "
                    "clients that clip and report it (KerasClient, or Flower's "
                    "adaptiveclipping_mod)")
        return super()._clipped(proxy, fit_res, norm, clip_norm, server_round)

    def _release(self, plan: _RoundPlan, total: NDArrays,
                 bits: list[bool]) -> tuple[NDArrays, dict[str, Scalar]]:
        noised, metrics = super()._release(plan, total, bits)
        noised_count = centred_unclipped_count(bits) + self._noise_rng().normal(
            0.0, self.count_stddev(plan.denominator))
        fraction = noised_count / plan.denominator + 0.5
        self.clip_norm = plan.clip_norm * math.exp(
            -self.clip_norm_lr * (fraction - self.target_quantile))
        return noised, {**metrics, "dp_unclipped_fraction": fraction}


@dataclass(frozen=True)
class DPSettings(LayerSettings):
    """The run-config keys a DP wrapper is built from (this module's `SETTINGS`, the
    sampling keys its accounting and release rules read, and whether SecAgg+ is on)."""

    noise_multiplier: float
    clipping_norm: float
    accountant: str
    dp_sampling: str
    target_delta: float
    dp_noise_seed: int
    max_epsilon: float
    dp_distributed_evaluation: bool
    fraction_fit: float
    min_fit_clients: int
    min_available_clients: int
    target_clipped_quantile: float
    clip_norm_lr: float
    clipped_count_stddev: float
    secure_aggregation: str


def dp_kwargs(settings: DPSettings, client_side: bool) -> dict[str, Any]:
    """The DP wrappers' keyword arguments from their settings."""
    accountant = PrivacyAccountant(settings.accountant, settings.dp_sampling,
                                   settings.fraction_fit, settings.target_delta)
    return dict(noise_multiplier=settings.noise_multiplier,
                clipping_norm=settings.clipping_norm, accountant=accountant,
                noise_seed=settings.dp_noise_seed, client_side=client_side,
                max_epsilon=settings.max_epsilon, fraction_fit=settings.fraction_fit,
                min_fit_clients=settings.min_fit_clients,
                min_available_clients=settings.min_available_clients,
                distributed_evaluation=settings.dp_distributed_evaluation)


def _adaptive(inner: Strategy, ctx: StrategyContext, client_side: bool) -> DPAdaptiveClipping:
    settings = DPSettings.from_config(ctx.cfg)
    return DPAdaptiveClipping(inner, **dp_kwargs(settings, client_side),
                              target_quantile=settings.target_clipped_quantile,
                              clip_norm_lr=settings.clip_norm_lr,
                              clipped_count_stddev=settings.clipped_count_stddev)


def _fixed(inner: Strategy, ctx: StrategyContext) -> DPFixedClipping:
    return DPFixedClipping(inner, **dp_kwargs(DPSettings.from_config(ctx.cfg), client_side=False))


ACCOUNTING = ("its privacy accounting assumes one noised average of a sampled cohort per "
               "synchronous round")
"""What every DP wrapper's spec says it needs (`StrategySpec.needs`; distributed_dp's too)."""
_SERVER_CLIPPING = f"clips each update on the server, and {ACCOUNTING}"
SPECS = [
    StrategySpec("dp-fixed", _fixed, wrapper=True,
                 needs=_SERVER_CLIPPING, sums=False, linear=False, takes_private_average=False),
    StrategySpec("dp-adaptive", partial(_adaptive, client_side=False), wrapper=True,
                 needs=_SERVER_CLIPPING, sums=False, linear=False, takes_private_average=False),
    StrategySpec("dp-client-adaptive", partial(_adaptive, client_side=True), wrapper=True,
                 needs=f"reads each client's clipping bit, and {ACCOUNTING}",
                 sums=False, linear=False, takes_private_average=False),
]
