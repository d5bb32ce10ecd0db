"""The strategy registry: `strategy=<name>` in the run config picks a factory here.

Adding a strategy: write one module with a factory `build(ctx: StrategyContext) ->
Strategy` (and a `SETTINGS` list for its own run-config keys, plus optionally a
`check_config(values)` raising `ConfigError` for rules across keys), then add one entry to
`REGISTRY` (and the module to `_SETTING_MODULES`).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.server.strategy import Strategy

from fl_app.settings import ConfigCheck, Setting, module_checks
from strategies import dp, flower_builtins, weighted_fedavg
from strategies.context import StrategyContext

StrategyFactory = Callable[[StrategyContext], Strategy]

REGISTRY: dict[str, StrategyFactory] = {
    "weighted-fedavg": weighted_fedavg.build,
    **flower_builtins.BUILDERS,
    **dp.BUILDERS,
}

_SETTING_MODULES = [weighted_fedavg, flower_builtins, dp]


def strategy_names() -> list[str]:
    """Every registered strategy name."""
    return list(REGISTRY)


def strategy_settings() -> list[Setting]:
    """The run-config keys that strategy modules declare."""
    return [setting for module in _SETTING_MODULES for setting in module.SETTINGS]


def strategy_checks() -> list[ConfigCheck]:
    """The cross-key checks (`check_config`) that strategy modules declare."""
    return module_checks(_SETTING_MODULES)


def build_strategy(ctx: StrategyContext) -> Strategy:
    """Build the strategy named by the run config's `strategy` key."""
    return REGISTRY[ctx.cfg["strategy"]](ctx)
