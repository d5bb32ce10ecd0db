"""`fl_app.api.server_strategy`: the app's strategies for a Flower user's own server, validated
by default, with ε in Flower's own `History` under DP (Flower's `Server` loop, real proxies)."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import Server

from fl_app.api import server_strategy
from fl_app.schema import ConfigError
from strategies.dp import DPFixedClipping
from strategies.protocols import find_layer
from strategies.validated import ValidatedStrategy
from strategies.weighted_fedavg import WeightedFedAvg
from tests.dp_rounds import client_manager, zeros
from tests.flower_objects import AnsweringProxy, fit_res

INITIAL = ndarrays_to_parameters(zeros())


def test_the_default_strategy_is_validated_weighted_averaging():
    strategy = server_strategy(initial_parameters=INITIAL)
    assert isinstance(strategy, ValidatedStrategy)
    assert type(strategy.inner) is WeightedFedAvg


def test_a_non_finite_update_is_rejected_not_averaged_in():
    strategy = server_strategy(initial_parameters=INITIAL, min_fit_clients=2,
                               min_available_clients=2)
    manager = client_manager(3)
    instructions = strategy.configure_fit(1, INITIAL, manager)
    bad = [np.full_like(w, np.nan) for w in zeros()]
    good = [np.ones_like(w) for w in zeros()]
    results = [(proxy, fit_res(bad if i == 0 else good, 10))
               for i, (proxy, _) in enumerate(instructions)]
    parameters, metrics = strategy.aggregate_fit(1, results, [])
    assert metrics["num_rejected"] == 1
    assert all(np.array_equal(w, g) for w, g in zip(parameters_to_ndarrays(parameters), good))


def test_a_bad_key_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match="noise-multiplier"):
        server_strategy(initial_parameters=INITIAL, strategy="dp-fixed", noise_multiplier=-1.0)


def test_dp_reports_epsilon_in_flowers_history():
    manager = client_manager(0)
    for i in range(4):
        manager.register(AnsweringProxy(f"c{i}"))
    strategy = server_strategy(initial_parameters=INITIAL, strategy="dp-fixed",
                               noise_multiplier=1.0, clipping_norm=1.0, min_fit_clients=4,
                               min_available_clients=4, fraction_evaluate=0.0)
    history, _ = Server(client_manager=manager, strategy=strategy).fit(num_rounds=3,
                                                                       timeout=None)
    epsilons = [value for _, value in history.metrics_distributed_fit["dp_epsilon"]]
    assert len(epsilons) == 3 and 0 < epsilons[0] < epsilons[1] < epsilons[2]
    dp = find_layer(strategy, DPFixedClipping)
    assert epsilons[-1] == pytest.approx(dp.privacy_report(3)["epsilon"])
    assert [value for _, value in history.metrics_distributed_fit["dp_delta"]] == [
        dp.accountant.delta] * 3


def test_the_dp_wrapper_accounts_by_default():
    wrapper = DPFixedClipping(WeightedFedAvg(), noise_multiplier=1.0, clipping_norm=1.0)
    assert (wrapper.accountant.kind, wrapper.accountant.sampling) == ("rdp", "fixed")


@pytest.mark.parametrize("key, value", [
    ("secure_aggregation", "secagg+"), ("homomorphic_encryption", "ckks"),
    ("compress_up", "int8"), ("prune_sparsity", 0.5), ("standardize", True),
    ("fuse_evaluate", True), ("server_loop", "fedbuff")])
def test_keys_that_need_this_apps_loop_and_clients_are_refused(key, value):
    overrides = {"examples_cap_factor": 0.0} if key == "secure_aggregation" else {}
    with pytest.raises(ConfigError, match=f"{key.replace('_', '-')}.*server_strategy"):
        server_strategy(initial_parameters=INITIAL, **{key: value}, **overrides)
