"""Strategy hyperparameter defaults: what the registry builds from the default config."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters
from flwr.server import strategy as fl

from strategies.compose import compose
from strategies.context import StrategyContext
from tests.conftest import make_config

# Measured on the default workload (docs/results.md, "Notes on the defaults"): each within 0.10 of
# weighted-fedavg after 5 rounds and 0.05 after 20. Flower's own FedYogi eta 0.01 and tau
# 1e-3 for FedAdagrad reach 0.71 and 0.75 after 5 rounds where weighted-fedavg reaches 0.93.
FEDOPT = {"fedadam": (fl.FedAdam, 0.1, 1e-3), "fedyogi": (fl.FedYogi, 0.1, 1e-3),
          "fedadagrad": (fl.FedAdagrad, 0.1, 1e-2)}


def built(**overrides) -> fl.Strategy:
    """The strategy the registry builds, without its ValidatedStrategy front."""
    cfg = make_config(**overrides)
    strategy = compose(StrategyContext(cfg, ndarrays_to_parameters([np.zeros(3)])), meter=False)
    return strategy.inner


@pytest.mark.parametrize("name", FEDOPT)
def test_fedopt_strategies_take_their_measured_server_step_by_default(name):
    cls, eta, tau = FEDOPT[name]
    strategy = built(strategy=name)
    assert isinstance(strategy, cls)
    assert (strategy.eta, strategy.tau) == (eta, tau)


@pytest.mark.parametrize("name", FEDOPT)
def test_a_set_fedopt_eta_or_tau_replaces_the_default(name):
    strategy = built(strategy=name, fedopt_eta=0.03, fedopt_tau=0.5)
    assert (strategy.eta, strategy.tau) == (0.03, 0.5)

