"""Strategy state for checkpoints: what a strategy carries from one round to the next.

Our strategies implement the `Stateful` protocol (strategies.protocols) themselves;
wrappers merge their own state under their own key. Flower's compat strategies have no
state API, so this module is the one place that knows the attributes in which the
stateful ones keep it: the FedOpt family (FedAdam, FedYogi, FedAdagrad: current weights
and the moments m_t, v_t) and FedAvgM (current weights and the momentum vector); a test
fails if a Flower release renames them. Every other Flower strategy is stateless across
rounds (QFedAvg's `pre_weights` is reset each round).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvgM, FedOpt, Strategy

from strategies.protocols import Stateful, StrategyState


class StrategyStateError(ValueError):
    """A saved strategy state does not fit the strategy it is restored into."""


def _arrays(value: Any) -> list[np.ndarray] | None:
    return None if value is None else [np.asarray(a) for a in value]


def _check_like(name: str, saved: list[np.ndarray] | None,
                current: list[np.ndarray] | None) -> None:
    if saved is None or current is None:
        return
    shapes = [a.shape for a in saved]
    expected = [a.shape for a in current]
    if shapes != expected:
        raise StrategyStateError(f"saved {name} has shapes {shapes}, the model has {expected}")


def _section(state: StrategyState, key: str, strategy: Strategy) -> dict[str, Any]:
    if key not in state:
        raise StrategyStateError(f"the saved strategy state has no '{key}' entry, so it was not "
                                 f"saved by {type(strategy).__name__}")
    return state[key]


def strategy_state(strategy: Strategy) -> StrategyState:
    """The state `strategy` carries across rounds ({} for a stateless strategy)."""
    if isinstance(strategy, Stateful):
        return strategy.get_state()
    if isinstance(strategy, FedOpt):
        return {"fedopt": {"current_weights": list(strategy.current_weights),
                           "m_t": strategy.m_t, "v_t": strategy.v_t}}
    if isinstance(strategy, FedAvgM):
        current = strategy.initial_parameters
        return {"fedavgm": {
            "current_weights": None if current is None else parameters_to_ndarrays(current),
            "momentum_vector": strategy.momentum_vector}}
    return {}


def set_strategy_state(strategy: Strategy, state: StrategyState) -> None:
    """Restore what `strategy_state` returned into a freshly built `strategy`."""
    if isinstance(strategy, Stateful):
        strategy.set_state(state)
    elif isinstance(strategy, FedOpt):
        saved = _section(state, "fedopt", strategy)
        weights = _arrays(saved["current_weights"])
        if weights is None:  # `strategy_state` always saves a list: the file was altered
            raise StrategyStateError("the saved FedOpt state has no current weights")
        _check_like("FedOpt weights", weights, list(strategy.current_weights))
        strategy.current_weights = weights
        strategy.m_t, strategy.v_t = _arrays(saved["m_t"]), _arrays(saved["v_t"])
    elif isinstance(strategy, FedAvgM):
        saved = _section(state, "fedavgm", strategy)
        weights = _arrays(saved["current_weights"])
        if weights is not None:
            strategy.initial_parameters = ndarrays_to_parameters(weights)
        strategy.momentum_vector = _arrays(saved["momentum_vector"])
