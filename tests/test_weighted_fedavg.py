"""WeightedFedAvg: equals Flower's weighted average, and (behind the validation every
strategy gets) never averages a bad update in."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy.aggregate import aggregate

from fl_app.server.client_manager import SeededClientManager
from strategies import ValidatedStrategy, WeightedFedAvg
from strategies.compose import compose
from strategies.context import StrategyContext
from strategies.metrics import weighted_metrics
from tests.conftest import make_config
from tests.flower_objects import IdleProxy, fit_res, random_model, results


def _strategy(global_model, max_examples: int = 0, **kwargs) -> ValidatedStrategy:
    """WeightedFedAvg behind the validation every registry strategy gets, which knows
    `global_model` as the model sent."""
    inner = WeightedFedAvg(initial_parameters=ndarrays_to_parameters(global_model), **kwargs)
    strategy = ValidatedStrategy(inner, min_fit_clients=inner.min_fit_clients,
                                 max_examples=max_examples)
    strategy.initialize_parameters(SimpleClientManager())
    return strategy


@pytest.mark.parametrize("seed", range(5))
def test_equals_flower_aggregate_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    count = int(rng.integers(2, 9))
    updates = [(random_model(rng), int(rng.integers(1, 500))) for _ in range(count)]
    strategy = _strategy(random_model(rng))
    params, metrics = strategy.aggregate_fit(1, results(updates), [])
    ours = parameters_to_ndarrays(params)
    flower = aggregate(updates)
    assert len(ours) == len(flower)
    for a, b in zip(ours, flower):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
        assert a.dtype == np.float32
    assert metrics["num_rejected"] == 0


def _bad_updates(good: list[np.ndarray]) -> dict[str, tuple[list[np.ndarray], int]]:
    nan = [a.copy() for a in good]
    nan[0][0, 0] = np.nan
    inf = [a.copy() for a in good]
    inf[2][1, 1] = -np.inf
    return {
        "nan": (nan, 10),
        "inf": (inf, 10),
        "wrong-shape": ([good[0][:2], good[1], good[2]], 10),
        "missing-array": (good[:2], 10),
        "extra-array": (good + [good[1]], 10),
        "wrong-dtype": ([a.astype(np.float64) for a in good], 10),
        "zero-examples": (good, 0),
        "negative-examples": (good, -5),
        "above-cap": (good, 10_000),
    }


@pytest.mark.parametrize("kind", list(_bad_updates(random_model(np.random.default_rng(0)))))
def test_bad_update_is_rejected_and_model_equals_aggregate_of_good_clients(kind, caplog):
    rng = np.random.default_rng(1)
    global_model = random_model(rng)
    good = [(random_model(rng), 20), (random_model(rng), 60)]
    bad = _bad_updates(random_model(rng))[kind]
    strategy = _strategy(global_model, max_examples=1000)
    all_results = results([good[0], bad, good[1]])
    params, metrics = strategy.aggregate_fit(3, all_results, [])
    merged = parameters_to_ndarrays(params)
    for ours, expected in zip(merged, aggregate(good)):
        np.testing.assert_allclose(ours, expected, atol=1e-6)
    assert all(np.all(np.isfinite(a)) for a in merged)
    assert metrics["num_rejected"] == 1
    assert "client c1" in caplog.text and "rejected" in caplog.text


def test_too_few_valid_updates_keep_the_previous_model():
    rng = np.random.default_rng(2)
    global_model = random_model(rng)
    bad = [a.copy() for a in global_model]
    bad[1][:] = np.nan
    strategy = _strategy(global_model, min_fit_clients=2)
    params, metrics = strategy.aggregate_fit(1, results([(random_model(rng), 5), (bad, 5)]), [])
    assert params is None and metrics["num_rejected"] == 1


def test_failures_are_tolerated_only_when_accepted():
    rng = np.random.default_rng(3)
    updates = results([(random_model(rng), 5), (random_model(rng), 5)])
    failure = [RuntimeError("client crashed")]
    assert _strategy(random_model(rng), accept_failures=True).aggregate_fit(1, updates, failure)[0]
    assert _strategy(random_model(rng), accept_failures=False).aggregate_fit(1, updates,
                                                                              failure)[0] is None


def test_fit_metrics_are_weighted_by_examples():
    rng = np.random.default_rng(4)
    res = [(IdleProxy("a"), fit_res(random_model(rng), 10, {"train_loss": 1.0})),
           (IdleProxy("b"), fit_res(random_model(rng), 30, {"train_loss": 3.0}))]
    _, metrics = _strategy(random_model(rng)).aggregate_fit(1, res, [])
    assert metrics["train_loss"] == pytest.approx(2.5)


def test_aggregate_fit_without_a_known_global_model_is_a_clear_error():
    updates = results([(random_model(np.random.default_rng(5)), 5)])
    with pytest.raises(RuntimeError, match="before configure_fit"):
        ValidatedStrategy(WeightedFedAvg(), min_fit_clients=1).aggregate_fit(1, updates, [])


def test_fit_metrics_cannot_overwrite_the_rejection_count():
    rng = np.random.default_rng(6)
    res = [(IdleProxy(c), fit_res(random_model(rng), 10, {"num_rejected": 0})) for c in "ab"]
    res.append((IdleProxy("bad"), fit_res(random_model(rng), 0)))
    _, metrics = _strategy(random_model(rng)).aggregate_fit(1, res, [])
    assert metrics["num_rejected"] == 1


def test_weighted_metrics_skip_non_finite_values():
    reports = [(10, {"accuracy": 0.5, "loss": float("nan")}), (30, {"accuracy": float("inf")}),
               (30, {"accuracy": 1.0, "loss": 2.0, "flag": True})]
    assert weighted_metrics(reports) == {"accuracy": pytest.approx((5 + 30) / 40),
                                         "loss": pytest.approx(2.0)}


def test_sampling_is_a_fraction_and_reproducible_with_a_seed():
    def sampled(seed: int) -> list[str]:
        manager = SeededClientManager(seed)
        for i in range(10):
            manager.register(IdleProxy(f"node-{i}"))
        strategy = WeightedFedAvg(fraction_fit=0.3, min_fit_clients=2)
        instructions = strategy.configure_fit(
            1, ndarrays_to_parameters(random_model(np.random.default_rng(0))), manager)
        return [proxy.cid for proxy, _ in instructions]

    assert len(sampled(7)) == 3
    assert sampled(7) == sampled(7)
    assert len({tuple(sampled(s)) for s in range(6)}) > 1


def _default_weighted_fedavg(global_model):
    """weighted-fedavg exactly as the registry builds it from the default config."""
    strategy = compose(StrategyContext(make_config(),
                                              ndarrays_to_parameters(global_model)))
    strategy.initialize_parameters(SimpleClientManager())
    return strategy


def test_by_default_one_client_claiming_a_huge_dataset_cannot_take_over_the_model(caplog):
    rng = np.random.default_rng(7)
    global_model = random_model(rng)
    honest = [(random_model(rng), n) for n in (100, 120, 90, 110)]
    attacker = ([a * 0 + 1000 for a in global_model], 10**12)
    params, metrics = _default_weighted_fedavg(global_model).aggregate_fit(
        1, results([*honest, attacker]), [])
    cap = 3 * 110  # examples-cap-factor x the lower median claim (90, 100, 110, 120, 10^12)
    for ours, expected in zip(parameters_to_ndarrays(params),
                              aggregate([*honest, (attacker[0], cap)])):
        np.testing.assert_allclose(ours, expected, rtol=1e-5)
    assert metrics["num_capped"] == 1
    assert "claims 1000000000000 examples, capped at 330" in caplog.text


def test_by_default_uncapped_claims_still_equal_flowers_aggregate_exactly():
    rng = np.random.default_rng(8)
    updates = [(random_model(rng), n) for n in (100, 240, 90, 270)]
    params, metrics = _default_weighted_fedavg(random_model(rng)).aggregate_fit(
        1, results(updates), [])
    for ours, expected in zip(parameters_to_ndarrays(params), aggregate(updates)):
        np.testing.assert_allclose(ours, expected, atol=1e-6, rtol=0)
    assert metrics["num_capped"] == 0
