"""The server's strategy chain, in one function: `compose`.

Every wrapper the run config asks for, in the one order that is correct (outermost first):

    WireMeter                  always: bytes up and down, as the messages carry them
    └─ CompressedStrategy      compress-up / compress-down != none: decodes each update, and
       │                       encodes the broadcast, so every layer below sees float32
       └─ PrunedStrategy       prune-sparsity > 0: checks each decoded update against the
          │                    round's mask, prunes the aggregate
          └─ ValidatedStrategy always: rejects (and logs) a bad update or report before any
             │                 layer below sees it; the min-fit-clients rule (0 under DP)
             └─ Stragglers     straggler-fraction > 0: a share of each cohort straggles
                └─ DP wrapper  strategy=dp-*: clips, noises, accounts (DistributedDP for
                   │           dp-client-fixed under secagg+: the clients add the noise)
                   └─ inner    strategy (dp-inner under a DP wrapper)

    homomorphic-encryption=ckks: WireMeter ─ HomomorphicAggregation ─ ValidatedStrategy ─
        [Stragglers ─] inner. HE adds ciphertexts outside the validated chain, which still
        configures the rounds and checks the evaluation reports (codecs and pruning are
        refused with HE: `strategies.combinations`).
    secure-aggregation=secagg+: the same chain; each fit round, `fl_app.server.secagg` hands
        Flower's SecAgg+ workflow an `AggregateOnly` adapter around it, which turns the
        unmasked sum into the one result the chain aggregates.
    server-loop=fedbuff: no chain; `fl_app.server.fedbuff_loop` runs its own
        `FedBuffAggregator` (validation included).

What combines with what is decided before, by the config's checks; `compose` only builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO

from flwr.common.logger import log
from flwr.server.strategy import Strategy

from fl_app.schema import LayerSettings
from strategies import homomorphic, secure
from strategies.combinations import spec_of
from strategies.compression import CompressedStrategy
from strategies.context import StrategyContext
from strategies.protocols import privacy_layer
from strategies.pruning import PrunedStrategy
from strategies.stragglers import Stragglers, keeps_partial_work
from strategies.validated import ValidatedStrategy
from strategies.wire_meter import WireMeter


@dataclass(frozen=True)
class ChainSettings(LayerSettings):
    """The keys that choose and parameterize the chain's wrappers (each key's meaning:
    docs/config.md); the inner strategies read their own keys from the context."""

    fraction_evaluate: float
    straggler_fraction: float
    local_epochs: int
    seed: int
    min_fit_clients: int
    max_examples: int
    outlier_norm_factor: float
    examples_cap_factor: float
    homomorphic_encryption: str
    he_public_context: str
    prune_sparsity: float
    prune_rounds: int
    compress_up: str
    compress_down: str
    compress_top_k: float
    error_feedback: bool


def compose(ctx: StrategyContext, *, meter: bool = True) -> Strategy:
    """The server's strategy chain for `ctx`'s run config (the module doc draws it);
    `meter=False` leaves out the outermost `WireMeter` (a caller that counts no bytes)."""
    cfg, chain = ctx.cfg, ChainSettings.from_config(ctx.cfg)
    if secure.protected(cfg) and chain.fraction_evaluate > 0:
        log(INFO, "fraction-evaluate=%s is not used: a run with secure aggregation or "
            "homomorphic encryption has no distributed evaluation (each client's loss and "
            "validation-set size would reach the server in the clear)", chain.fraction_evaluate)
    spec = spec_of(cfg)
    if spec.wrapper:
        strategy = spec.build(spec_of(cfg, "dp-inner").build(ctx), ctx)
    else:
        strategy = spec.build(ctx)
    if chain.straggler_fraction > 0:
        strategy = Stragglers(strategy, fraction=chain.straggler_fraction,
                              keep=keeps_partial_work(cfg), local_epochs=chain.local_epochs,
                              seed=chain.seed)
    # A privacy-accounting strategy's release is never held back by min-fit-clients
    # (skipping a round would reveal, un-noised, that clients failed).
    accounts_privacy = privacy_layer(strategy) is not None
    strategy = ValidatedStrategy(
        strategy, min_fit_clients=0 if accounts_privacy else chain.min_fit_clients,
        max_examples=chain.max_examples, outlier_norm_factor=chain.outlier_norm_factor,
        examples_cap_factor=chain.examples_cap_factor)
    if chain.homomorphic_encryption != "none":
        strategy = homomorphic.wrap(strategy, public_context_path=chain.he_public_context,
                                    initial=ctx.initial_parameters,
                                    min_fit_clients=chain.min_fit_clients)
    else:
        if chain.prune_sparsity:
            strategy = PrunedStrategy(strategy, sparsity=chain.prune_sparsity,
                                      rounds=chain.prune_rounds)
        if chain.compress_up != "none" or chain.compress_down != "none":
            strategy = CompressedStrategy(strategy, up=chain.compress_up, down=chain.compress_down,
                                          top_k=chain.compress_top_k,
                                          error_feedback=chain.error_feedback)
    return WireMeter(strategy) if meter else strategy
