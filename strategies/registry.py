"""The strategy registry: `strategy=<name>` in the run config picks a factory here.

Adding a strategy: write one module with a `SPECS` list of `strategies.spec.StrategySpec`s
(the factory `build(ctx: StrategyContext) -> Strategy`, or for a wrapper `build(inner, ctx)`,
and the capability flags that say what it combines with), a `SETTINGS` list for its own
run-config keys and optionally a `check_config(values)` raising `ConfigError` for rules
across keys; then add the module to `strategies.combinations.STRATEGY_MODULES`
(`WRAPPER_MODULES`). The registry collects the names, keys and checks itself,
`strategies.combinations` derives every refusal from the flags, and `build_strategy` puts
every strategy behind `ValidatedStrategy`, the one validation path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from logging import INFO

from flwr.common.logger import log
from flwr.server.strategy import Strategy

from fl_app.schema import ConfigCheck, Scalar, Setting, module_checks
from strategies import (
    combinations,
    compression,
    context,
    fedbuff,
    homomorphic,
    pruning,
    secure,
    stragglers,
    validation,
)
from strategies.combinations import SPECS, STRATEGY_MODULES, WRAPPER_MODULES
from strategies.context import StrategyContext
from strategies.distributed_dp import secure_wrapper
from strategies.protocols import PrivacyAccounting, find_layer
from strategies.validated import ValidatedStrategy

STRATEGIES: dict[str, Callable[[StrategyContext], Strategy]] = {
    name: spec.build for name, spec in SPECS.items() if not spec.wrapper}
WRAPPERS: dict[str, Callable[[Strategy, StrategyContext], Strategy]] = {
    name: spec.build for name, spec in SPECS.items() if spec.wrapper}


def evaluates_distributed(cfg: Mapping[str, Scalar]) -> bool:
    """Whether the run's clients evaluate the global model (and report it): some clients
    are sampled for it (`secure.evaluate_fraction`: none in a protected run), and a DP
    wrapper releases it only with `dp-distributed-evaluation` (its metrics are outside ε)."""
    dp_gated = cfg["strategy"] in WRAPPERS and not cfg["dp-distributed-evaluation"]
    return secure.evaluate_fraction(cfg) > 0 and not dp_gated


def strategy_names() -> list[str]:
    """Every registered strategy name (plain strategies, then wrappers)."""
    return [*STRATEGIES, *WRAPPERS]


_OWN_SETTINGS = [
    Setting("strategy", str, "weighted-fedavg", "Server strategy, by registry name.", "run",
            choices=strategy_names),
    Setting("dp-inner", str, "weighted-fedavg",
            "DP strategies: the inner strategy given the privatized average (a non-DP "
            "registry name).", "privacy", choices=tuple(STRATEGIES)),
]
_SETTING_MODULES = [context, validation, secure, compression, pruning, stragglers,
                    *STRATEGY_MODULES, *WRAPPER_MODULES, homomorphic, fedbuff]

SETTINGS: list[Setting] = [*_OWN_SETTINGS,
                           *(s for module in _SETTING_MODULES for s in module.SETTINGS)]
"""Every run-config key of the strategies layer: sampling, validation, each strategy's."""

check_config: ConfigCheck = module_checks([*_SETTING_MODULES, combinations])
"""Every cross-key rule the strategy modules declare."""


def build_strategy(ctx: StrategyContext) -> Strategy:
    """The strategy named by `strategy` (a wrapper around the plain `dp-inner` one; under
    secure aggregation, `dp-client-fixed` is distributed DP: `strategies.distributed_dp`),
    with simulated stragglers when `straggler-fraction` is set, behind `ValidatedStrategy`,
    behind `PrunedStrategy` when `prune-sparsity` is set (it checks the decoded updates
    against the round's mask and prunes the aggregate), behind `CompressedStrategy` when
    either direction is compressed (so validation, DP and every strategy see decoded
    weights). A privacy-accounting strategy's release is never held back by the
    `min-fit-clients` rule (skipping a round would reveal, un-noised, that clients failed).
    With `homomorphic-encryption=ckks`, `HomomorphicAggregation` goes outside: it adds the
    encrypted updates itself (the validated chain still configures the rounds and checks
    the evaluation reports); it refuses compression."""
    cfg = ctx.cfg
    name = str(cfg["strategy"])
    if secure.protected(cfg) and cfg["fraction-evaluate"] > 0:
        log(INFO, "fraction-evaluate=%s is not used: a run with secure aggregation or "
            "homomorphic encryption has no distributed evaluation (each client's loss and "
            "validation-set size would reach the server in the clear)", cfg["fraction-evaluate"])
    if name in WRAPPERS:
        wrap = secure_wrapper(name, ctx) or WRAPPERS[name]
        strategy = wrap(STRATEGIES[str(cfg["dp-inner"])](ctx), ctx)
    else:
        strategy = STRATEGIES[name](ctx)
    strategy = stragglers.with_stragglers(strategy, ctx)
    accounts_privacy = find_layer(strategy, PrivacyAccounting) is not None
    validated = ValidatedStrategy(
        strategy, min_fit_clients=0 if accounts_privacy else int(cfg["min-fit-clients"]),
        max_examples=int(cfg["max-examples"]),
        outlier_norm_factor=float(cfg["outlier-norm-factor"]),
        examples_cap_factor=float(cfg["examples-cap-factor"]))
    if cfg["homomorphic-encryption"] != "none":
        return homomorphic.wrap(validated, public_context_path=str(cfg["he-public-context"]),
                                initial=ctx.initial_parameters,
                                min_fit_clients=int(cfg["min-fit-clients"]))
    return compression.compressed(pruning.pruned(validated, cfg), cfg)
