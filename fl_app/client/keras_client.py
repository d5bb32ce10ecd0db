"""The client: a Keras model and one client's local data behind a Flower NumPyClient."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar

from fl_app.client.adaptive_work import AdaptiveWork
from fl_app.client.local_work import NodeWork
from fl_app.data.rebalance import rebalance
from fl_app.data.sources import ClientData
from fl_app.ml.standardize import Standardization, moments
from fl_app.ml.trainer import KerasTrainer
from fl_app.protocol.clipping import add_noise, clip_weights
from fl_app.protocol.pruning_mask import check_round_sparsity, round_mask
from fl_app.schema import LayerSettings
from fl_app.wire import (
    CLIENT_KEY,
    FUSED_COUNT,
    FUSED_LOSS,
    FUSED_PREFIX,
    KEY_BATCH_SIZE,
    KEY_CLIPPING_NORM,
    KEY_DP_NOISE_STD,
    KEY_FUSE_EVALUATE,
    KEY_LOCAL_STEPS,
    KEY_LOSS_BEFORE,
    KEY_LR_SCALE,
    KEY_NORM_BIT,
    KEY_PROXIMAL_MU,
    KEY_STANDARDIZATION,
    KEY_STATISTICS,
    NUM_EXAMPLES,
    ROUND_KEYS,
    SERVER_ROUND,
)


@dataclass(frozen=True)
class ClientSettings(LayerSettings):
    """The run-config keys a `KerasClient` reads: the round's work and rate it falls back to
    when the fit config does not carry them, and what its own run allows (client sampling
    by size, standardization, the pruning schedule, rebalancing, the seed): built once by
    the app layer (`ClientSettings.from_config(cfg)`)."""

    local_epochs: int
    batch_size: int
    learning_rate: float
    client_sampling: str
    standardize: bool
    prune_sparsity: float
    prune_rounds: int
    rebalance: str
    seed: int

    def round_defaults(self) -> dict[str, Scalar]:
        """The per-round keys (`fl_app.wire.ROUND_KEYS`) as this run sets them."""
        return {key: getattr(self, key.replace("-", "_")) for key in ROUND_KEYS}


class KerasClient(NumPyClient):
    """A Flower NumPyClient that trains a Keras model on one client's data.

    `trainer` wraps any Keras model with its optimizer (see `KerasTrainer`) and is shared
    by every client of a run in the process; each call loads the server's weights and starts
    the optimizer fresh, and ends with `trainer.forget()` (the model's initial weights
    back), so no client or later run can read another's weights. Local epochs, batch size
    and learning rate come from the round's config (falling back to `defaults`), epochs
    and batch size overridden by the node's own `work` (node-config, a time budget; see
    `fl_app.client.local_work`); the steps taken go back as `local_steps`. FedProx's
    `proximal_mu` adds the proximal term to the local loss; a `clipping_norm` in the
    config (client-side DP) clips the returned update to that L2 norm and reports
    `norm_bit` (keys in `fl_app.wire`, clipping in `fl_app.protocol.clipping`); a `dp_noise_std`
    as well (distributed DP under secure aggregation) adds Gaussian noise of that std to the
    clipped update, from OS entropy, and reports `num_examples=1` and no metrics at all: the
    DP sum weighs clients equally, and a curious server must learn nothing but the sum. With
    `fuse-evaluate` in the config (and no `dp_noise_std`) a fit first evaluates the received
    weights exactly as `evaluate` does and adds that as `eval_loss`, `eval_num_examples`
    and `eval_<metric>` to its metrics (one message per round instead of two). With
    `loss_before` in the config (q-FFL, `strategies.qffl`; not with client-side DP) a fit
    first evaluates the received weights on its own training data and reports that loss
    as `loss_before`. Fit metrics carry the data's quality report, numbers only
    (`data_rows`, `data_dropped_*`, a warning's `data_single_class` or
    `data_largest_class`/`data_smallest_class`). `client_key` (the partition id in
    simulation, a CRC of the data file's name in deployment) varies the shuffling between clients;
    it stays on the node. `public_key` is what `get_properties` tells the server
    (`fl_app.client.node_policy.public_client_key`; empty: nothing), with the size of its
    training set when its own run config samples clients by size (`client-sampling='size'`,
    which the config refuses in protected and DP runs). Under `standardize=true` a fit whose
    config asks for `statistics` trains nothing and returns the sums of its training data
    (`fl_app.ml.standardize.moments`; a regression target's too); later fits and
    evaluations standardize with the pooled `standardization` their config carries.
    `rebalance` (a `fl_app.data.rebalance` mode) reweights or resamples the training data
    by its own class counts every round, seeded like the shuffling; the example count sent
    stays the data's. A `prune-sparsity` in the config (`strategies.pruning`) makes the fit
    derive the round's mask from the received weights and keep those entries at zero; a fit
    whose sparsity is not the one its own run config schedules for the round is refused.
    With `adaptive` (`round-time-budget`, `fl_app.client.adaptive_work`) a fit without a
    node time budget trains the steps and batch size its plan picks, at the rate scaled by
    its `lr_scale`, and reports `batch_size` and `lr_scale` too. `slowdown` > 1 (a
    simulated straggler, `fl_app.client.faults`) makes training and evaluation that many
    times slower where they run, so the node's own clock sees it.
    """

    def __init__(self, trainer: KerasTrainer, data: ClientData, settings: ClientSettings,
                 client_key: int = 0, work: NodeWork | None = None, public_key: str = "",
                 adaptive: AdaptiveWork | None = None, slowdown: float = 1.0) -> None:
        self.trainer = trainer
        self.data = data
        self.settings = settings
        self.client_key = client_key
        self.work = work if work is not None else NodeWork()
        self.public_key = public_key
        self.adaptive = adaptive
        self.slowdown = slowdown

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """The client's `public_key`, a name that stays the same across runs (the server
        orders clients by it for seeded sampling; none when it has no such name), and its
        training-set size when the run samples clients by size."""
        properties: dict[str, Scalar] = {CLIENT_KEY: self.public_key} if self.public_key else {}
        if self.settings.client_sampling == "size":
            properties[NUM_EXAMPLES] = len(self.data.train)
        return properties

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        """The model's initial weights (built or loaded; never a fit's or evaluation's)."""
        return self.trainer.get_weights()

    def fit(self, parameters: NDArrays,
            config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train locally from the global weights; return new weights, example count, metrics."""
        try:
            return self._fit(parameters, config)
        finally:
            self.trainer.forget()

    def _standardization(self, config: Mapping[str, Scalar]) -> Standardization | None:
        """The pooled statistics the config carries, when this client's own run config has
        `standardize=true` (a server cannot impose them on any other run), else None;
        ValueError when they are not statistics of this client's data (`from_bytes`)."""
        data = config.get(KEY_STANDARDIZATION)
        if not self.settings.standardize or not isinstance(data, bytes):
            return None
        return Standardization.from_bytes(data, self.trainer.spec)

    def _check_statistics_request(self, config: dict[str, Scalar]) -> None:
        """Raise ValueError unless this run standardizes (`standardize=true`) in the clear:
        the data sums go out unclipped and un-noised, so a server must not get them from a
        run that promised client-side DP, or from one that never asked for them."""
        if not self.settings.standardize:
            raise ValueError("the server asked for this client's data statistics, but this "
                             "run has standardize=false: refused, nothing sent")
        if KEY_CLIPPING_NORM in config or KEY_DP_NOISE_STD in config:
            raise ValueError("the server asked for this client's data statistics in a "
                             "client-side DP round: refused, nothing sent")

    def _fused_evaluation(self, parameters: NDArrays,
                          config: dict[str, Scalar]) -> dict[str, Scalar]:
        """`evaluate`'s result as fit metrics, when the config asks for it (else none)."""
        if config.get(KEY_FUSE_EVALUATE) is not True or KEY_DP_NOISE_STD in config:
            return {}
        loss, count, metrics = self.evaluate(parameters, config)
        return {FUSED_LOSS: loss, FUSED_COUNT: count,
                **{FUSED_PREFIX + name: value for name, value in metrics.items()}}

    def _loss_before(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """The loss of the weights just set on the training data, as `loss_before`, when the
        config asks for it (q-FFL) and the round is not a client-side DP one (clipping, with
        or without noise: the loss would be a per-client figure outside the DP accounting;
        no DP run aggregates with q-FFL, `strategies.qffl.check_config`), else none."""
        if (config.get(KEY_LOSS_BEFORE) is not True or KEY_DP_NOISE_STD in config
                or KEY_CLIPPING_NORM in config):
            return {}
        loss, _ = self.trainer.evaluate(self.data.train, self._standardization(config),
                                        self.slowdown)
        return {KEY_LOSS_BEFORE: loss}

    def _fit(self, parameters: NDArrays,
             config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """`fit` before the trainer forgets (see `fit`)."""
        train = self.data.train
        if config.get(KEY_STATISTICS) is True:
            self._check_statistics_request(config)
            target = train.y if self.trainer.spec.task == "regression" else None
            return moments(train.x, target), len(train), {}
        check_round_sparsity(config, self.settings.prune_sparsity, self.settings.prune_rounds)
        fused = self._fused_evaluation(parameters, config)
        epochs, batch_size, time_budget = self.work.plan(config, self.settings.round_defaults())
        learning_rate = float(config.get("learning-rate", self.settings.learning_rate)) or None
        steps, plan, chosen = None, None, {}
        if self.adaptive is not None and time_budget is None:
            plan = self.adaptive.choose(self.trainer, train, batch_size, self.slowdown)
            epochs, batch_size, steps = None, plan.batch_size, plan.steps
            if plan.lr_scale != 1.0:
                base_rate = learning_rate or self.trainer.base_learning_rate()
                if base_rate is None:  # on a schedule, where `AdaptiveWork.choose` keeps 1.0
                    raise RuntimeError("adaptive work scaled the learning rate of an "
                                       "optimizer that follows a schedule")
                learning_rate = base_rate * plan.lr_scale
            chosen = {KEY_BATCH_SIZE: batch_size, KEY_LR_SCALE: plan.lr_scale}
        self.trainer.set_weights(parameters)
        loss_before = self._loss_before(config)
        server_round = int(config.get(SERVER_ROUND, 0))
        seed = [self.settings.seed, server_round, self.client_key]
        train, sample_weight = rebalance(self.data.train, self.settings.rebalance, seed)
        result = self.trainer.fit(
            train,
            epochs=epochs,
            batch_size=batch_size,
            time_budget=time_budget,
            steps=steps,
            slowdown=self.slowdown,
            learning_rate=learning_rate,
            proximal_mu=float(config.get(KEY_PROXIMAL_MU, 0.0)),
            seed=seed,
            standardization=self._standardization(config),
            sample_weight=sample_weight,
            pruned=round_mask(config, parameters),
        )
        if plan is not None and self.adaptive is not None:
            self.adaptive.trained(plan, result.seconds)
        metrics: dict[str, Scalar] = {
            "train_loss": result.loss, "train_seconds": result.seconds,
            KEY_LOCAL_STEPS: result.steps, **chosen,
            **{f"train_{name}": value for name, value in result.metrics.items()},
            **self.data.quality.as_metrics(), **fused, **loss_before}
        weights = self.trainer.get_weights()
        if KEY_CLIPPING_NORM in config:  # client-side DP: clip the update to C ourselves
            weights, metrics[KEY_NORM_BIT] = clip_weights(weights, parameters,
                                                          float(config[KEY_CLIPPING_NORM]))
            if KEY_DP_NOISE_STD in config:  # distributed DP: our share of the noise
                noised = add_noise(weights, float(config[KEY_DP_NOISE_STD]),
                                   np.random.default_rng())
                return noised, 1, {}
        return weights, len(self.data.train), metrics  # the data's count, not a resample's

    def evaluate(self, parameters: NDArrays,
                 config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        """Evaluate the global weights on the local validation split (train if none)."""
        split = self.data.val if len(self.data.val) else self.data.train
        try:
            self.trainer.set_weights(parameters)
            loss, metrics = self.trainer.evaluate(split, self._standardization(config),
                                                  self.slowdown)
        finally:
            self.trainer.forget()
        return loss, len(split), dict(metrics)
