"""Each client's distributed evaluation and its spread across clients in the round records,
never under DP, SecAgg+ or HE: Flower's server loop (`FederatedServer`) with the registry's
strategies and clients that answer in process."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Code, EvaluateRes, Status, ndarrays_to_parameters

from fl_app.app.server_app import fit_config, fuses_evaluation
from fl_app.server.round_log import round_scalars
from fl_app.server.runner import FederatedServer, client_evaluations, fairness
from fl_app.server.stopping import StoppingRules
from fl_app.wire import FUSED_COUNT, FUSED_LOSS, KEY_FUSE_EVALUATE
from strategies.compose import compose
from strategies.context import StrategyContext
from tests.conftest import make_config
from tests.flower_objects import AnsweringProxy, IdleProxy, random_model

CLIENTS = 4
DP = dict(strategy="dp-fixed", dp_distributed_evaluation=True)


class EvaluatingProxy(AnsweringProxy):
    """A client that answers every fit and reports `accuracy` and `loss` when evaluated,
    or inside its fit reply when the fit config fuses the evaluation."""

    def __init__(self, cid: str, accuracy: float, loss: float) -> None:
        super().__init__(cid)
        self.accuracy, self.loss, self.evaluations = accuracy, loss, 0

    def evaluate(self, ins, timeout, group_id):
        self.evaluations += 1
        return EvaluateRes(Status(Code.OK, "ok"), self.loss, 10, {"accuracy": self.accuracy})

    def fit(self, ins, timeout, group_id):
        res = super().fit(ins, timeout, group_id)
        if ins.config.get(KEY_FUSE_EVALUATE):
            self.evaluations += 1
            res.metrics.update({FUSED_LOSS: self.loss, FUSED_COUNT: 10,
                                "eval_accuracy": self.accuracy})
        return res


def _clients() -> list[EvaluatingProxy]:
    return [EvaluatingProxy(f"c{i}", accuracy=0.2 * (i + 1), loss=2.0 - 0.4 * i)
            for i in range(CLIENTS)]


def _rounds(clients: list[EvaluatingProxy], **config) -> list[dict]:
    """The round records of a 2-round run of the registry's strategy for `config`."""
    cfg = make_config(min_fit_clients=CLIENTS, min_available_clients=CLIENTS,
                      min_evaluate_clients=CLIENTS, examples_cap_factor=0.0, **config)
    model = ndarrays_to_parameters(random_model(np.random.default_rng(0)))
    rounds: list[dict] = []
    server = FederatedServer(
        strategy=compose(StrategyContext(cfg, model, on_fit_config_fn=fit_config(cfg))),
        seed=0, stopping=StoppingRules(),
        on_round=lambda record, p: rounds.append(record), on_finish=lambda reason, p: None,
        fuse_evaluate=fuses_evaluation(cfg), directions={"accuracy": "up"})
    for client in clients:
        server.client_manager().register(client)
    server.fit(num_rounds=2, timeout=None)
    return rounds[1:]


def test_fairness_is_the_mean_the_worst_and_best_tenth_and_the_variance_across_clients():
    accuracies = np.linspace(0.0, 0.95, 20)  # 20 clients: each tail is 2 of them
    reports = {f"c{i}": {"accuracy": a, "loss": 1.0 - a, "num_examples": 5 + i}
               for i, a in enumerate(accuracies)}
    summary = fairness(reports, {"accuracy": "up"})
    assert set(summary) == {"accuracy", "loss"}  # not the example counts
    assert summary["accuracy"] == pytest.approx({
        "mean": np.mean(accuracies), "worst_10": np.mean(accuracies[:2]),
        "best_10": np.mean(accuracies[-2:]), "variance": np.var(accuracies)})
    # a loss is worse when higher
    assert summary["loss"]["worst_10"] == pytest.approx(1.0 - np.mean(accuracies[:2]))
    assert summary["loss"]["best_10"] == pytest.approx(1.0 - np.mean(accuracies[-2:]))
    # with fewer than 10 clients the tails are one client each
    few = fairness({"a": {"accuracy": 0.1}, "b": {"accuracy": 0.9}, "c": {"accuracy": 0.5}})
    assert (few["accuracy"]["worst_10"], few["accuracy"]["best_10"]) == (0.1, 0.9)


def test_a_report_not_of_the_form_clients_send_is_left_out():
    ok = EvaluateRes(Status(Code.OK, ""), 0.5, 10, {"accuracy": 0.75, "note": "x",
                                                      "bad": float("nan")})
    nan_loss = EvaluateRes(Status(Code.OK, ""), float("nan"), 10, {})
    float_count = EvaluateRes(Status(Code.OK, ""), 0.5, 10.0, {})
    reports = client_evaluations([(IdleProxy("a"), ok), (IdleProxy("b"), nan_loss),
                                  (IdleProxy("c"), float_count)])
    assert reports == {"a": {"loss": 0.5, "num_examples": 10, "accuracy": 0.75}}


def test_a_clients_metrics_cannot_overwrite_its_checked_loss_or_count():
    forged = EvaluateRes(Status(Code.OK, ""), 0.5, 10, {"loss": 1e300, "num_examples": -7.5})
    assert client_evaluations([(IdleProxy("a"), forged)]) == {
        "a": {"loss": 0.5, "num_examples": 10}}


@pytest.mark.parametrize("fused", [False, True])
def test_each_clients_evaluation_and_their_spread_are_recorded_every_round(fused):
    rounds = _rounds(_clients(), fuse_evaluate=fused)
    assert len(rounds) == 2
    for record in rounds:
        assert record["client_evaluations"] == {
            f"c{i}": {"loss": pytest.approx(2.0 - 0.4 * i), "num_examples": 10,
                      "accuracy": pytest.approx(0.2 * (i + 1))} for i in range(CLIENTS)}
        assert record["fairness"]["accuracy"] == pytest.approx(
            {"mean": 0.5, "worst_10": 0.2, "best_10": 0.8, "variance": 0.05})
        assert record["fairness"]["loss"]["worst_10"] == pytest.approx(2.0)
        scalars = round_scalars(record)  # history.csv: the spread is a series, a client not
        assert scalars["fairness/accuracy/worst_10"] == pytest.approx(0.2)
        assert not any(name.startswith("client_evaluations") for name in scalars)


@pytest.mark.parametrize("protection", [
    DP, dict(secure_aggregation="secagg+", secagg_min_clients=CLIENTS),
    dict(homomorphic_encryption="ckks")])
def test_nothing_per_client_is_recorded_under_dp_secagg_or_he(protection):
    cfg = make_config(examples_cap_factor=0.0, fuse_evaluate=True, **protection)
    if protection is DP:  # DP releases the average evaluation, asked for, never a client's
        clients = _clients()
        rounds = _rounds(clients, **protection)
        assert all(client.evaluations == 2 for client in clients)
        assert all(record["distributed"]["accuracy"] == pytest.approx(0.5) for record in rounds)
        assert not any("client_evaluations" in r or "fairness" in r for r in rounds)
        return
    # a protected run sends no evaluate message and fuses no evaluation into a fit
    assert StrategyContext(cfg, ndarrays_to_parameters([])).common_kwargs()[
        "fraction_evaluate"] == 0.0
    assert not fuses_evaluation(cfg)
    if "secure_aggregation" in protection:
        clients = _clients()
        rounds = _rounds(clients, **protection)
        assert all(client.evaluations == 0 for client in clients)
        assert not any("client_evaluations" in r or "fairness" in r for r in rounds)
