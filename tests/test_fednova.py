"""FedNova: the normalised average against a hand computation, and how it composes."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager

from fl_app.schema import ConfigError
from strategies.fednova import MAX_EXTRAPOLATION, FedNova
from strategies.weighted_fedavg import WeightedFedAvg
from tests.conftest import make_config
from tests.flower_objects import IdleProxy, fit_res, random_model


def _configured(strategy, global_model):
    manager = SimpleClientManager()
    manager.register(IdleProxy("c0"))
    strategy.configure_fit(1, ndarrays_to_parameters(global_model), manager)
    return strategy


def _results(models, counts, steps):
    return [(IdleProxy(f"c{i}"), fit_res(m, n, {"local_steps": s}))
            for i, (m, n, s) in enumerate(zip(models, counts, steps))]


def test_matches_a_hand_computation():
    x = [np.array([1.0, 2.0], np.float32)]
    clients = [[np.array([0.0, 2.0], np.float32)], [np.array([1.0, -2.0], np.float32)]]
    # p = (1/4, 3/4); tau = (2, 8); tau_eff = 0.5 + 6 = 6.5
    # d_1 = (x - x_1)/2 = (0.5, 0);  d_2 = (x - x_2)/8 = (0, 0.5)
    # sum p_i d_i = (0.125, 0.375);  x_new = x - 6.5 * that = (0.1875, -0.4375)
    strategy = _configured(FedNova(min_fit_clients=1, min_available_clients=1), x)
    params, _ = strategy.aggregate_fit(1, _results(clients, [10, 30], [2, 8]), [])
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], [0.1875, -0.4375],
                               rtol=1e-6)
    # FedAvg would give (0.75, -1.0): the client with 4x the steps pulls it further
    avg, _ = WeightedFedAvg().aggregate_fit(1, _results(clients, [10, 30], [2, 8]), [])
    np.testing.assert_allclose(parameters_to_ndarrays(avg)[0], [0.75, -1.0], rtol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_equal_steps_give_exactly_fedavg(seed):
    rng = np.random.default_rng(seed)
    x = random_model(rng)
    models = [random_model(rng) for _ in range(4)]
    counts = [int(c) for c in rng.integers(1, 100, 4)]
    nova = _configured(FedNova(min_fit_clients=1, min_available_clients=1), x)
    ours, _ = nova.aggregate_fit(1, _results(models, counts, [5] * 4), [])
    avg, _ = WeightedFedAvg().aggregate_fit(1, _results(models, counts, [5] * 4), [])
    for a, b in zip(parameters_to_ndarrays(ours), parameters_to_ndarrays(avg)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert a.dtype == np.float32


@pytest.mark.parametrize("steps", [None, 0, 1e-9, 2.5, float("nan"), True])
def test_an_update_without_a_whole_number_of_steps_is_left_out_and_logged(caplog, steps):
    x = [np.zeros(2, np.float32)]
    strategy = _configured(FedNova(min_fit_clients=1, min_available_clients=1), x)
    results = _results([[np.ones(2, np.float32)], [np.full(2, 9.0, np.float32)]], [5, 5],
                       [4, steps])
    if steps is None:
        results[1][1].metrics.pop("local_steps")
    params, _ = strategy.aggregate_fit(1, results, [])
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], [1.0, 1.0])
    assert "leaves out client c1" in caplog.text


def test_refused_inside_a_dp_wrapper():
    with pytest.raises(ConfigError, match="dp-inner"):
        make_config(strategy="dp-fixed", dp_inner="fednova")


def test_a_client_with_far_fewer_steps_counts_at_most_four_times_its_update():
    # tau = (1, 100) with p = (1/2, 1/2): tau_eff = 50.5; the paper's rule would take the
    # first client's update 50.5 times; bounded, its tau counts as 50.5 / 4
    x = [np.zeros(1, np.float32)]
    clients = [[np.array([-1.0], np.float32)], [np.array([-1.0], np.float32)]]
    strategy = _configured(FedNova(min_fit_clients=1, min_available_clients=1), x)
    params, _ = strategy.aggregate_fit(1, _results(clients, [10, 10], [1, 100]), [])
    tau_eff = 50.5
    moved = 0.5 * MAX_EXTRAPOLATION + 0.5 * tau_eff / 100  # 2.2525, not 0.5 * 50.5 + 0.2525
    np.testing.assert_allclose(parameters_to_ndarrays(params)[0], [-moved], rtol=1e-6)
