"""Update validation in every strategy we ship: a bad update never changes the aggregate.

Each strategy is built through the registry (as a run builds it) and called directly with
real Flower `FitRes` objects: the result with one bad update among good ones must be
finite, count one rejection, and equal what the same strategy makes of the good ones alone.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import (
    Code,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.strategy import FedAvg

from fl_app.server.client_failures import ClientFailure, describe_failure
from fl_app.server.client_manager import SeededClientManager
from strategies.compose import compose
from strategies.context import StrategyContext
from strategies.registry import strategy_names
from strategies.validated import ValidatedStrategy
from strategies.validation import update_norm, validate_fit_results
from tests.conftest import make_config
from tests.flower_objects import IdleProxy, fit_res, random_model

# DP strategies average over a fixed denominator (a rejected client counts as a zero
# update, by design) and add noise: they are covered by their own tests.
STRATEGIES = [name for name in strategy_names() if not name.startswith("dp-")]
NUM_GOOD = 5


def _good_updates(global_model, rng) -> list[tuple[list[np.ndarray], int]]:
    return [([(g + 0.05 * rng.normal(size=g.shape)).astype(g.dtype) for g in global_model],
             int(rng.integers(20, 200))) for _ in range(NUM_GOOD)]


def _undecodable(good: list[np.ndarray]) -> FitRes:
    return FitRes(Status(Code.OK, "ok"), Parameters(tensors=[b"not a numpy array"] * len(good),
                                                    tensor_type="numpy.ndarray"), 10, {})


def bad_updates(global_model: list[np.ndarray], good: list[np.ndarray]) -> dict[str, FitRes]:
    """One malformed or hostile FitRes per kind of bad update."""
    nan = [a.copy() for a in good]
    nan[0][0, 0] = np.nan
    inf = [a.copy() for a in good]
    inf[2][1, 1] = -np.inf
    outlier = [(g + 100.0 * (a - g)).astype(a.dtype) for a, g in zip(good, global_model)]
    return {
        "nan": fit_res(nan, 10),
        "inf": fit_res(inf, 10),
        "wrong-shape": fit_res([good[0][:2], *good[1:]], 10),
        "missing-array": fit_res(good[:-1], 10),
        "extra-array": fit_res([*good, good[1]], 10),
        "wrong-dtype": fit_res([a.astype(np.float64) for a in good], 10),
        "zero-examples": fit_res(good, 0),
        "negative-examples": fit_res(good, -5),
        "above-cap": fit_res(good, 10_000),
        "undecodable": _undecodable(good),
        "norm-outlier": fit_res(outlier, 10),
    }


BAD_KINDS = list(bad_updates(random_model(np.random.default_rng(0)),
                             random_model(np.random.default_rng(1))))


def _strategy(name: str, global_model: list[np.ndarray], **overrides):
    cfg = make_config(strategy=name, max_examples=1000, outlier_norm_factor=3.0,
                      min_fit_clients=2, min_available_clients=2, **overrides)
    strategy = compose(StrategyContext(cfg, ndarrays_to_parameters(global_model)))
    manager = SeededClientManager(0)
    for i in range(NUM_GOOD + 1):
        manager.register(IdleProxy(f"c{i}"))
    params = strategy.initialize_parameters(manager)
    strategy.configure_fit(1, params, manager)
    return strategy


def _aggregate(name, global_model, updates):
    strategy = _strategy(name, global_model)
    return strategy.aggregate_fit(1, updates, [])


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_update_is_rejected_and_aggregate_equals_good_clients(name, kind):
    rng = np.random.default_rng(7)
    global_model = random_model(rng)
    updates = _good_updates(global_model, rng)
    # every client reports its local steps (FedNova normalises by them) and its loss (q-FFL
    # weighs by it)
    good = [(IdleProxy(f"c{i}"), fit_res(a, n, {"local_steps": 5, "loss_before": 1.0 + i}))
            for i, (a, n) in enumerate(updates)]
    bad = (IdleProxy("bad"), bad_updates(global_model, updates[0][0])[kind])

    with_bad, metrics = _aggregate(name, global_model, [good[0], bad, *good[1:]])
    good_only, good_metrics = _aggregate(name, global_model, good)

    assert metrics["num_rejected"] == 1 and good_metrics["num_rejected"] == 0
    ours, reference = parameters_to_ndarrays(with_bad), parameters_to_ndarrays(good_only)
    for a, b, g in zip(ours, reference, global_model, strict=True):
        assert np.all(np.isfinite(a))
        assert a.dtype == g.dtype and a.shape == g.shape
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["weighted-fedavg", "fedavg", "fedmedian"])
def test_too_few_valid_updates_keep_the_previous_model(name):
    rng = np.random.default_rng(3)
    global_model = random_model(rng)
    good = _good_updates(global_model, rng)[0]
    nan = [np.full_like(a, np.nan) for a in global_model]
    updates = [(IdleProxy("c0"), fit_res(*good)), (IdleProxy("c1"), fit_res(nan, 10))]
    params, metrics = _aggregate(name, global_model, updates)
    assert params is None and metrics["num_rejected"] == 1


def test_outlier_rejection_is_off_by_default_and_keeps_honest_updates():
    rng = np.random.default_rng(5)
    global_model = random_model(rng)
    updates = _good_updates(global_model, rng)
    big = [(g + 100.0 * (a - g)).astype(a.dtype) for a, g in zip(updates[0][0], global_model)]
    results = [(IdleProxy(f"c{i}"), fit_res(a, n)) for i, (a, n) in enumerate(updates)]
    results.append((IdleProxy("big"), fit_res(big, 10)))
    assert validate_fit_results(results, global_model, 1).rejected == []
    checked = validate_fit_results(results, global_model, 1, outlier_norm_factor=3.0)
    assert [cid for cid, _ in checked.rejected] == ["big"]
    assert "median update norm" in checked.rejected[0][1]
    assert len(checked.accepted) == NUM_GOOD


def test_update_norm_is_the_l2_norm_over_all_layers():
    reference = [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)]
    arrays = [np.full((2, 2), 1.0, np.float32), np.array([2.0, 0.0, 0.0], np.float32)]
    assert update_norm(arrays, reference) == pytest.approx(np.sqrt(4 + 4))


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizers_keep_the_model_dtype_so_next_round_updates_are_accepted(name):
    rng = np.random.default_rng(11)
    global_model = random_model(rng)
    strategy = _strategy(name, global_model)
    manager = SeededClientManager(0)
    for i in range(NUM_GOOD):
        manager.register(IdleProxy(f"c{i}"))
    params = ndarrays_to_parameters(global_model)
    for server_round in (1, 2, 3):
        strategy.configure_fit(server_round, params, manager)
        current = parameters_to_ndarrays(params)
        results = [(IdleProxy(f"c{i}"), fit_res(a, n))
                   for i, (a, n) in enumerate(_good_updates(current, rng))]
        params, metrics = strategy.aggregate_fit(server_round, results, [])
        assert metrics["num_rejected"] == 0
        assert [a.dtype for a in parameters_to_ndarrays(params)] == [np.float32] * 3


def test_a_failed_client_call_names_the_client():
    """Flower records a raising client as a bare exception; ours carry the client's id."""
    manager = SeededClientManager(0)
    manager.register(IdleProxy("c3"))
    proxy = manager.all()["c3"]
    with pytest.raises(ClientFailure) as raised:
        proxy.fit(FitIns(ndarrays_to_parameters([]), {}), timeout=None, group_id=0)
    assert raised.value.cid == "c3" and isinstance(raised.value.error, NotImplementedError)
    assert describe_failure(raised.value) == {"client": "c3", "error": "NotImplementedError: "}
    assert describe_failure(ValueError("x")) == {"client": "unknown", "error": "ValueError: x"}


def _evaluate_res(loss: float, num_examples: int, accuracy: float) -> EvaluateRes:
    return EvaluateRes(Status(Code.OK, "ok"), loss, num_examples, {"accuracy": accuracy})


BAD_EVALUATIONS = {
    "zero-examples": _evaluate_res(0.5, 0, 0.9),
    "negative-examples": _evaluate_res(0.5, -5, 0.9),
    "above-cap": _evaluate_res(1e6, 10**12, 0.0),
    "nan-loss": _evaluate_res(float("nan"), 50, 0.0),
    "inf-loss": _evaluate_res(float("inf"), 50, 0.0),
}


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("kind", list(BAD_EVALUATIONS))
def test_bad_evaluation_is_rejected_and_distributed_loss_equals_good_clients(name, kind, caplog):
    rng = np.random.default_rng(9)
    strategy = _strategy(name, random_model(rng))
    good = [(IdleProxy(f"c{i}"), _evaluate_res(float(rng.uniform(0.1, 2.0)),
                                              int(rng.integers(20, 200)), float(rng.uniform())))
            for i in range(NUM_GOOD)]
    bad = (IdleProxy("bad"), BAD_EVALUATIONS[kind])

    loss, metrics = strategy.aggregate_evaluate(1, [good[0], bad, *good[1:]], [])
    good_loss, good_metrics = strategy.aggregate_evaluate(1, good, [])

    expected = sum(r.num_examples * r.loss for _, r in good) / sum(r.num_examples for _, r in good)
    assert loss == pytest.approx(expected) and loss == pytest.approx(good_loss)
    assert metrics["accuracy"] == pytest.approx(good_metrics["accuracy"])
    assert metrics["num_rejected"] == 1 and good_metrics["num_rejected"] == 0
    assert "rejected evaluation from client bad" in caplog.text


@pytest.mark.parametrize("name", ["weighted-fedavg", "fedavg"])
def test_only_bad_evaluations_give_no_distributed_loss_but_count(name):
    strategy = _strategy(name, random_model(np.random.default_rng(10)))
    bad = [(IdleProxy(kind), res) for kind, res in BAD_EVALUATIONS.items()]
    loss, metrics = strategy.aggregate_evaluate(1, bad, [])
    assert loss is None and metrics["num_rejected"] == len(BAD_EVALUATIONS)


def test_outlier_check_is_skipped_when_most_updates_are_unchanged():
    """A median update norm of 0 must not turn every honest non-zero update into an outlier."""
    rng = np.random.default_rng(12)
    global_model = random_model(rng)
    moved = _good_updates(global_model, rng)[:2]
    results = [(IdleProxy(f"same{i}"), fit_res(global_model, 10)) for i in range(3)]
    results += [(IdleProxy(f"moved{i}"), fit_res(a, n)) for i, (a, n) in enumerate(moved)]
    checked = validate_fit_results(results, global_model, 1, outlier_norm_factor=3.0)
    assert checked.rejected == [] and len(checked.accepted) == 5


def test_validated_strategy_aggregate_fit_before_configure_fit_is_a_clear_error():
    strategy = ValidatedStrategy(FedAvg(), min_fit_clients=1)
    updates = [(IdleProxy("c0"), fit_res(random_model(np.random.default_rng(13)), 10))]
    with pytest.raises(RuntimeError, match="before configure_fit"):
        strategy.aggregate_fit(1, updates, [])


def test_a_client_cannot_forge_the_servers_counts_in_the_round_record():
    from fl_app.server.round_record import evaluation_section, fit_section

    assert evaluation_section(0.5, {"loss": 99.0, "accuracy": 0.9}) == \
        {"loss": 0.5, "accuracy": 0.9}
    forged = {"num_clients": 999, "num_sampled": 999, "num_failures": 0, "accuracy": 0.9}
    fit = fit_section(forged, replies=3, failures=[{"client": "7", "error": "x"}], timing={})
    assert (fit["num_clients"], fit["num_sampled"], fit["num_failures"]) == (3, 4, 1)
