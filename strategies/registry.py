"""The strategy registry: `strategy=<name>` in the run config picks a factory here.

Adding a strategy: write one module with a `SPECS` list of `strategies.spec.StrategySpec`s
(the factory `build(ctx: StrategyContext) -> Strategy`, or for a wrapper `build(inner, ctx)`,
and the capability flags that say what it combines with), a `SETTINGS` list for its own
run-config keys and optionally a `check_config(values)` raising `ConfigError` for rules
across keys; then add the module to `strategies.combinations.STRATEGY_MODULES`
(`WRAPPER_MODULES`). The registry collects the names, keys and checks itself,
`strategies.combinations` derives every refusal from the flags, and `strategies.compose.compose`
builds the server's chain around it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

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

# the strategy-by-mode rules run before the modes' own key rules: a refused strategy is
# named first, as each mode's check did when it held the name lists
check_config: ConfigCheck = module_checks(
    [context, validation, combinations,
     *(module for module in _SETTING_MODULES if module not in (context, validation))])
"""Every cross-key rule the strategy modules declare."""
