"""q-FFL (`strategy=qfedavg`): each client weighted by its own loss, as the paper's q-FedAvg."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import QFedAvg as FlowerQFedAvg
from flwr.server.strategy import Strategy

from fl_app.schema import ConfigError
from fl_app.server.client_manager import SeededClientManager
from fl_app.wire import KEY_LOSS_BEFORE
from strategies.compose import compose
from strategies.context import StrategyContext
from strategies.qffl import QFedAvg
from tests.conftest import make_config
from tests.flower_objects import IdleProxy, fit_res, random_model

ORIGIN = [np.zeros(2, np.float32)]
D = 0.01  # each client's step from the global model
# client a moved along the first axis, client b along the second, by the same amount
MOVED = [[np.array([-D, 0.0], np.float32)], [np.array([0.0, -D], np.float32)]]
LOSSES = [0.1, 5.0]
L = 10.0


def _server_loss(server_round, arrays, config):
    """The server's centralized loss, the same for every client (what Flower's QFedAvg uses)."""
    return 2.0, {}


def _configured(strategy: Strategy, global_model, clients: int = 2) -> Strategy:
    manager = SeededClientManager(0)
    for i in range(clients):
        manager.register(IdleProxy(f"c{i}"))
    strategy.initialize_parameters(manager)
    strategy.configure_fit(1, ndarrays_to_parameters(global_model), manager)
    return strategy


def _registry_qffl(**overrides) -> Strategy:
    cfg = make_config(strategy="qfedavg", qffl_lipschitz=L, min_fit_clients=2,
                      min_available_clients=2, **overrides)
    return compose(StrategyContext(cfg, ndarrays_to_parameters(ORIGIN),
                                          evaluate_fn=_server_loss))


def _results(models, losses, counts=(10, 10)):
    return [(IdleProxy(f"c{i}"), fit_res(m, n, {KEY_LOSS_BEFORE: f}))
            for i, (m, f, n) in enumerate(zip(models, losses, counts))]


def _movement(strategy: Strategy, losses=LOSSES) -> np.ndarray:
    """How far the aggregate moved the global model along each client's axis."""
    params, _ = _configured(strategy, ORIGIN).aggregate_fit(1, _results(MOVED, losses), [])
    return -parameters_to_ndarrays(params)[0].astype(np.float64)


def test_two_clients_with_losses_0_1_and_5_at_q_1_weigh_1_to_50():
    moved = _movement(_registry_qffl(qffl_q=1.0))
    assert moved[1] / moved[0] == pytest.approx(50.0, rel=1e-5)
    # the paper's step: Delta_k = L d e_k, h_k = ||Delta_k||^2 + L F_k at q = 1
    denominator = 2 * (L * D) ** 2 + L * sum(LOSSES)
    np.testing.assert_allclose(moved, [f * L * D / denominator for f in LOSSES], rtol=1e-5)


def test_the_servers_loss_would_weigh_them_equally():
    """The control: Flower's QFedAvg, which weighs every client by the server's centralized
    loss, moves the model equally towards both; so would q-FFL given one loss for both."""
    flower = FlowerQFedAvg(q_param=1.0, qffl_learning_rate=1 / L, evaluate_fn=_server_loss,
                           min_fit_clients=2, min_available_clients=2,
                           initial_parameters=ndarrays_to_parameters(ORIGIN))
    moved = _movement(flower)
    assert moved[1] / moved[0] == pytest.approx(1.0)
    same_loss = _movement(_registry_qffl(qffl_q=1.0), losses=[2.0, 2.0])
    assert same_loss[1] / same_loss[0] == pytest.approx(1.0)


def test_q_0_is_the_unweighted_mean_of_the_models_whatever_the_losses_and_counts():
    rng = np.random.default_rng(0)
    x = random_model(rng)
    models = [random_model(rng) for _ in range(3)]
    strategy = _configured(QFedAvg(q=0.0, lipschitz=L), x, clients=3)
    params, _ = strategy.aggregate_fit(1, _results(models, [0.1, 3.0, 9.0], [5, 50, 500]), [])
    for ours, *layers in zip(parameters_to_ndarrays(params), *models):
        np.testing.assert_allclose(ours, np.mean(layers, axis=0), rtol=1e-5, atol=1e-6)
        assert ours.dtype == np.float32


def test_each_sampled_client_is_asked_for_its_loss_before_training():
    manager = SeededClientManager(0)
    for i in range(3):
        manager.register(IdleProxy(f"c{i}"))
    instructions = QFedAvg(q=1.0, lipschitz=L, on_fit_config_fn=lambda r: {"server-round": r}
                           ).configure_fit(4, ndarrays_to_parameters(ORIGIN), manager)
    assert [ins.config for _, ins in instructions] == [
        {"server-round": 4, KEY_LOSS_BEFORE: True}] * 3


@pytest.mark.parametrize("loss", [None, -1.0, float("nan"), float("inf"), "high", True])
def test_an_update_without_a_finite_loss_is_left_out_and_logged(caplog, loss):
    strategy = _configured(QFedAvg(q=1.0, lipschitz=L, min_fit_clients=1), ORIGIN)
    results = _results(MOVED, [1.0, loss])
    if loss is None:
        results[1][1].metrics.pop(KEY_LOSS_BEFORE)
    params, _ = strategy.aggregate_fit(1, results, [])
    moved = -parameters_to_ndarrays(params)[0]
    assert moved[0] > 0 and moved[1] == 0  # only c0's update
    assert "leaves out client c1" in caplog.text


def test_refused_inside_a_dp_wrapper():
    with pytest.raises(ConfigError, match="dp-inner"):
        make_config(strategy="dp-fixed", dp_inner="qfedavg")


@pytest.mark.slow  # runs a Flower simulation
def test_a_simulated_run_weighs_by_the_clients_own_losses_and_records_each_client(tmp_path):
    """End to end: the real clients report their loss (so no update is left out and the
    model moves), the clients are sampled by size, and every client's evaluation is
    recorded with the spread across clients."""
    from fl_app.cli import simulate

    config = ("strategy='qfedavg' client-sampling='size' fraction-fit=0.5 num-server-rounds=2 "
              "local-epochs=1 min-evaluate-clients=4 min-available-clients=4")
    assert simulate.main(["--num-supernodes", "4", "--run-config", config,
                          "--out", str(tmp_path)]) == 0
    rounds = json.loads((tmp_path / "history.json").read_text())["rounds"]
    losses = [r["centralized"]["loss"] for r in rounds]
    assert losses[-1] < losses[0]  # the model moved: the updates were not left out
    for record in rounds[1:]:
        assert record["fit"]["num_clients"] == 2 and record["fit"][KEY_LOSS_BEFORE] > 0
        assert len(record["client_evaluations"]) == 4
        assert 0 <= record["fairness"]["accuracy"]["worst_10"] <= record["fairness"][
            "accuracy"]["mean"] <= record["fairness"]["accuracy"]["best_10"] <= 1


def test_a_lying_loss_is_capped_and_an_overflowing_step_keeps_the_model():
    """A client reporting loss 1e300 counts as 100 x the round's lower median loss, not as
    the whole step; powers that overflow keep the global model instead of crashing."""
    from strategies.qffl import QFedAvg, qffl_step

    base = [np.zeros(3, np.float32)]
    honest, liar = [np.ones(3, np.float32)], [np.full(3, 50.0, np.float32)]
    lied = qffl_step(base, [honest, honest, liar], [1.0, 1.0, 1e300], q=1.0, lipschitz=1.0)
    assert np.allclose(lied[0], liar[0])  # uncapped, the liar's model is the new model
    capped = QFedAvg(q=1.0, lipschitz=1.0).step(base, [honest, honest, liar],
                                                 [1.0, 1.0, 1e300], [1, 1, 1])
    assert float(capped[0][0]) < 10.0
    kept = qffl_step(base, [honest, liar], [1e300, 1e300], q=10.0, lipschitz=1.0)
    np.testing.assert_array_equal(kept[0], base[0])
