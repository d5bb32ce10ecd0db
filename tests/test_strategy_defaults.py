"""Strategy hyperparameter defaults: what the registry builds from the default config."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters
from flwr.server import strategy as fl

from strategies.context import StrategyContext
from strategies.registry import build_strategy
from tests.conftest import make_config

FEDOPT = {"fedadam": (fl.FedAdam, 0.1), "fedyogi": (fl.FedYogi, 0.01),
          "fedadagrad": (fl.FedAdagrad, 0.1)}


def built(**overrides) -> fl.Strategy:
    """The strategy the registry builds, without its ValidatedStrategy front."""
    cfg = make_config(**overrides)
    strategy = build_strategy(StrategyContext(cfg, ndarrays_to_parameters([np.zeros(3)])))
    return strategy.inner


@pytest.mark.parametrize("name", FEDOPT)
def test_fedopt_strategies_default_to_flowers_own_server_learning_rate(name):
    cls, eta = FEDOPT[name]
    strategy = built(strategy=name)
    assert isinstance(strategy, cls)
    assert strategy.eta == eta == inspect.signature(cls).parameters["eta"].default
    assert strategy.tau == 1e-3  # Reddi et al.'s recommended adaptivity, unchanged


@pytest.mark.parametrize("name", FEDOPT)
def test_a_set_fedopt_eta_replaces_the_default(name):
    assert built(strategy=name, fedopt_eta=0.03).eta == 0.03
