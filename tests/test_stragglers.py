"""Simulated stragglers (FedProx paper): who straggles, and drop vs keep."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters
from flwr.server.client_manager import SimpleClientManager

from fl_app.schema import ConfigError
from fl_app.wire import KEY_STRAGGLER_EPOCHS, round_config
from strategies.compose import compose
from strategies.context import StrategyContext
from strategies.stragglers import Stragglers
from strategies.weighted_fedavg import WeightedFedAvg
from tests.conftest import make_config
from tests.flower_objects import IdleProxy, fit_res


def _manager(n: int) -> SimpleClientManager:
    manager = SimpleClientManager()
    for i in range(n):
        manager.register(IdleProxy(f"c{i}"))
    return manager


def _inner() -> WeightedFedAvg:
    return WeightedFedAvg(min_fit_clients=1, min_available_clients=1,
                          on_fit_config_fn=lambda rnd: round_config(make_config(
                              local_epochs=20), rnd))


@pytest.mark.parametrize("fraction, stragglers", [(0.0, 0), (0.5, 5), (0.9, 9)])
def test_drop_leaves_the_paper_share_of_sampled_clients_out(fraction, stragglers):
    strategy = Stragglers(_inner(), fraction=fraction, keep=False, local_epochs=20)
    for server_round in (1, 2, 3):
        instructions = strategy.configure_fit(server_round, ndarrays_to_parameters([]),
                                              _manager(10))
        assert len(instructions) == 10 - stragglers
        assert all(KEY_STRAGGLER_EPOCHS not in ins.config for _, ins in instructions)


def test_keep_sends_stragglers_a_partial_1_to_e_minus_1_epochs_and_aggregates_them():
    strategy = Stragglers(_inner(), fraction=0.5, keep=True, local_epochs=20, seed=3)
    partial = []
    for server_round in range(1, 21):
        instructions = strategy.configure_fit(server_round, ndarrays_to_parameters([]),
                                              _manager(10))
        assert len(instructions) == 10
        epochs = [ins.config[KEY_STRAGGLER_EPOCHS] for _, ins in instructions
                  if KEY_STRAGGLER_EPOCHS in ins.config]
        assert len(epochs) == 5
        partial += epochs
    assert min(partial) >= 1 and max(partial) <= 19 and len(set(partial)) > 5
    updates = [(IdleProxy("a"), fit_res([np.zeros(2, np.float32)], 1)),
                (IdleProxy("b"), fit_res([np.full(2, 2.0, np.float32)], 1))]
    params, metrics = strategy.aggregate_fit(20, updates, [])
    assert params is not None and metrics["stragglers_kept"] == 5


def test_the_choice_is_reproducible_from_the_seed():
    # stragglers are positions in the sample, which the app's seeded client manager orders
    def chosen(seed):
        strategy = Stragglers(_inner(), fraction=0.5, keep=True, local_epochs=20, seed=seed)
        instructions = strategy.configure_fit(1, ndarrays_to_parameters([]), _manager(10))
        return [ins.config.get(KEY_STRAGGLER_EPOCHS) for _, ins in instructions]
    assert chosen(1) == chosen(1)
    assert any(chosen(seed) != chosen(1) for seed in range(2, 6))


def test_auto_policy_keeps_partial_work_for_fedprox_and_drops_it_otherwise():
    def policy(strategy):
        cfg = make_config(strategy=strategy, straggler_fraction=0.5)
        built = compose(StrategyContext(cfg, ndarrays_to_parameters([])), meter=False)
        return built.inner.keep
    assert policy("fedprox") is True
    assert policy("weighted-fedavg") is False
    assert "Stragglers" not in repr(compose(StrategyContext(
        make_config(), ndarrays_to_parameters([]))))


def test_kept_stragglers_need_at_least_two_local_epochs():
    with pytest.raises(ConfigError, match="local-epochs >= 2"):
        make_config(strategy="fedprox", straggler_fraction=0.5, local_epochs=1)
    make_config(strategy="weighted-fedavg", straggler_fraction=0.5, local_epochs=1)  # drop: fine
