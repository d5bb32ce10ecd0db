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

from logging import INFO

from flwr.common.logger import log
from flwr.server.strategy import Strategy

from strategies import homomorphic, secure
from strategies.combinations import spec_of
from strategies.compression import CompressedStrategy
from strategies.context import StrategyContext
from strategies.distributed_dp import secure_wrapper
from strategies.protocols import PrivacyAccounting, find_layer
from strategies.pruning import PrunedStrategy
from strategies.stragglers import Stragglers, keeps_partial_work
from strategies.validated import ValidatedStrategy
from strategies.wire_meter import WireMeter


def compose(ctx: StrategyContext, *, meter: bool = True) -> Strategy:
    """The server's strategy chain for `ctx`'s run config (the module doc draws it);
    `meter=False` leaves out the outermost `WireMeter` (a caller that counts no bytes)."""
    cfg = ctx.cfg
    if secure.protected(cfg) and float(cfg["fraction-evaluate"]) > 0:
        log(INFO, "fraction-evaluate=%s is not used: a run with secure aggregation or "
            "homomorphic encryption has no distributed evaluation (each client's loss and "
            "validation-set size would reach the server in the clear)", cfg["fraction-evaluate"])
    spec = spec_of(cfg)
    if spec.wrapper:
        wrap = secure_wrapper(spec.name, ctx) or spec.build
        strategy = wrap(spec_of(cfg, "dp-inner").build(ctx), ctx)
    else:
        strategy = spec.build(ctx)
    if float(cfg["straggler-fraction"]) > 0:
        strategy = Stragglers(strategy, fraction=float(cfg["straggler-fraction"]),
                              keep=keeps_partial_work(cfg), local_epochs=int(cfg["local-epochs"]),
                              seed=int(cfg["seed"]))
    # A privacy-accounting strategy's release is never held back by min-fit-clients
    # (skipping a round would reveal, un-noised, that clients failed).
    accounts_privacy = find_layer(strategy, PrivacyAccounting) is not None
    strategy = ValidatedStrategy(
        strategy, min_fit_clients=0 if accounts_privacy else int(cfg["min-fit-clients"]),
        max_examples=int(cfg["max-examples"]),
        outlier_norm_factor=float(cfg["outlier-norm-factor"]),
        examples_cap_factor=float(cfg["examples-cap-factor"]))
    if cfg["homomorphic-encryption"] != "none":
        strategy = homomorphic.wrap(strategy, public_context_path=str(cfg["he-public-context"]),
                                    initial=ctx.initial_parameters,
                                    min_fit_clients=int(cfg["min-fit-clients"]))
    else:
        if cfg["prune-sparsity"]:
            strategy = PrunedStrategy(strategy, sparsity=float(cfg["prune-sparsity"]),
                                      rounds=int(cfg["prune-rounds"]))
        if cfg["compress-up"] != "none" or cfg["compress-down"] != "none":
            strategy = CompressedStrategy(strategy, up=str(cfg["compress-up"]),
                                          down=str(cfg["compress-down"]),
                                          top_k=float(cfg["compress-top-k"]),
                                          error_feedback=bool(cfg["error-feedback"]))
    return WireMeter(strategy) if meter else strategy
