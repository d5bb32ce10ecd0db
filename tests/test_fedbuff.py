"""FedBuff's aggregation (staleness weighting, the staleness bound, validation) against hand
computation, the combinations it refuses, and the straggler factor."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.server.strategy.aggregate import aggregate

from fl_app.app.local_client import client_for
from fl_app.client.faults import FaultSettings, assign_roles, node_slowdown, with_faults
from fl_app.data.sources import data_spec, load_partition
from fl_app.data.types import DataSettings
from fl_app.ml.trainer import TrainSettings, trainer_for
from fl_app.schema import ConfigError
from fl_app.wire import round_config
from strategies.fedbuff import FedBuffAggregator, staleness_weight
from tests.conftest import make_config


def _aggregator(weights, **kwargs) -> FedBuffAggregator:
    options = dict(buffer_size=2, max_staleness=10, server_lr=1.0, staleness_exponent=0.5)
    options.update(kwargs)
    return FedBuffAggregator(weights, **options)


def test_staleness_weight_is_one_over_sqrt_one_plus_s():
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == pytest.approx(0.5)
    assert staleness_weight(8, 0.5) == pytest.approx(1 / 3)
    assert staleness_weight(8, 1.0) == pytest.approx(1 / 9)
    assert staleness_weight(8, 0.0) == 1.0
    with pytest.raises(ValueError):
        staleness_weight(-1, 0.5)


def test_a_version_is_the_staleness_weighted_delta_average_computed_by_hand():
    current = [np.array([1.0, 2.0], dtype=np.float32)]
    agg = _aggregator(current, version=3)
    # Fresh: trained from version 3 (the current weights), delta [2, 0], 10 examples.
    fresh = agg.add([np.array([3.0, 2.0], np.float32)], 10, base_version=3, base_weights=current)
    # Stale by 3: trained from version 0 = [0, 0], delta [1, 1], weight 1/sqrt(4) = 0.5.
    stale = agg.add([np.array([1.0, 1.0], np.float32)], 30, base_version=0,
                    base_weights=[np.zeros(2, np.float32)])
    assert (fresh.problem, fresh.staleness, stale.problem, stale.staleness) == (None, 0, None, 3)
    assert agg.ready()
    step = agg.apply()
    # (10 * 1 * [2, 0] + 30 * 0.5 * [1, 1]) / 40 = [0.875, 0.375]
    np.testing.assert_allclose(agg.weights[0], [1.875, 2.375], rtol=1e-6)
    assert agg.weights[0].dtype == np.float32
    assert (agg.version, step.version, step.num_updates) == (4, 4, 2)
    record = step.record()
    assert record["staleness_mean"] == 1.5 and record["staleness_max"] == 3
    assert agg.buffer == [] and not agg.ready()


def test_server_lr_scales_the_step():
    w0 = [np.zeros(3, np.float32)]
    agg = _aggregator(w0, buffer_size=1, server_lr=0.5)
    agg.add([np.full(3, 4.0, np.float32)], 5, base_version=0, base_weights=w0)
    agg.apply()
    np.testing.assert_allclose(agg.weights[0], [2.0, 2.0, 2.0])


def test_updates_beyond_max_staleness_are_rejected_and_never_averaged():
    w = [np.zeros(2, np.float32)]
    agg = _aggregator(w, max_staleness=2, version=3, buffer_size=1)
    too_stale = agg.add([np.ones(2, np.float32)], 10, base_version=0, base_weights=w)
    assert too_stale.staleness == 3
    assert "fedbuff-max-staleness=2" in too_stale.problem
    assert not agg.ready()
    at_bound = agg.add([np.ones(2, np.float32)], 10, base_version=1, base_weights=w)
    assert at_bound.problem is None and at_bound.staleness == 2
    agg.apply()  # (1 + 2)^-0.5 * [1, 1]
    np.testing.assert_allclose(agg.weights[0], [3 ** -0.5] * 2, rtol=1e-6)


def test_invalid_updates_are_rejected():
    w = [np.zeros(2, np.float32)]
    agg = _aggregator(w, max_examples=100)
    assert "NaN" in agg.add([np.array([np.nan, 0], np.float32)], 1, base_version=0,
                            base_weights=w).problem
    assert "shape" in agg.add([np.zeros(3, np.float32)], 1, base_version=0,
                              base_weights=w).problem
    assert "max-examples" in agg.add([np.zeros(2, np.float32)], 101, base_version=0,
                                     base_weights=w).problem
    assert agg.buffer == []


def test_one_fresh_buffer_of_every_client_with_lr_1_is_weighted_fedavg():
    rng = np.random.default_rng(0)
    w0 = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)]
    clients = [([rng.normal(size=a.shape).astype(np.float32) for a in w0], n)
               for n in (5, 17, 40)]
    agg = _aggregator(w0, buffer_size=3)
    for arrays, n in clients:
        agg.add(arrays, n, base_version=0, base_weights=w0)
    agg.apply()
    for got, want in zip(agg.weights, aggregate(clients)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_claims_above_the_cap_factor_are_capped():
    w = [np.zeros(1, np.float32)]
    agg = _aggregator(w, buffer_size=3, examples_cap_factor=2.0)
    for value, n in ((1.0, 10), (1.0, 10), (100.0, 10**9)):
        agg.add([np.full(1, value, np.float32)], n, base_version=0, base_weights=w)
    step = agg.apply()
    # The liar's claim is capped at 2 x 10: (10 + 10 + 20 * 100) / 40.
    assert step.num_capped == 1
    np.testing.assert_allclose(agg.weights[0], [2020 / 40], rtol=1e-6)


@pytest.mark.parametrize("strategy, reason", [
    ("dp-fixed", "privacy accounting"), ("dp-client-adaptive", "privacy accounting"),
    ("krum", "robust aggregator"), ("bulyan", "robust aggregator"),
    ("fedmedian", "robust aggregator"), ("fedtrimmedavg", "robust aggregator"),
    ("fedadam", "server step")])
def test_fedbuff_refuses_strategies_whose_guarantee_needs_a_round(strategy, reason):
    with pytest.raises(ConfigError) as err:
        make_config(server_loop="fedbuff", strategy=strategy)
    assert "'server-loop'='fedbuff'" in str(err.value)
    assert f"'strategy'={strategy!r}" in str(err.value) and reason in str(err.value)
    make_config(server_loop="sync", strategy=strategy)  # fine synchronously


def test_fedbuff_refuses_round_based_checks_and_distributed_monitors():
    with pytest.raises(ConfigError, match="'outlier-norm-factor'"):
        make_config(server_loop="fedbuff", outlier_norm_factor=3.0)
    with pytest.raises(ConfigError, match="'monitor'='distributed_accuracy'"):
        make_config(server_loop="fedbuff", monitor="distributed_accuracy")
    with pytest.raises(ConfigError, match="'straggler-fraction'.*slow-client-fraction"):
        make_config(server_loop="fedbuff", straggler_fraction=0.5, local_epochs=2)
    for strategy in ("weighted-fedavg", "fedavg", "fedprox"):
        make_config(server_loop="fedbuff", strategy=strategy)


def test_stragglers_are_a_seeded_role_that_leaves_the_other_roles_alone():
    base = make_config(attack="sign-flip", attack_fraction=0.2)
    slow = base.replace(slow_client_fraction=0.3)
    roles = assign_roles(FaultSettings.from_config(slow), 10)
    assert sorted(roles.values()).count("straggler") == 3
    others = {p: r for p, r in roles.items() if r != "straggler"}
    assert others == assign_roles(FaultSettings.from_config(base), 10)
    assert assign_roles(FaultSettings.from_config(slow.replace(seed=7)), 10) != roles
    with pytest.raises(ConfigError, match="slow-client-fraction"):
        make_config(attack="sign-flip", attack_fraction=0.8, slow_client_fraction=0.3)


def test_a_straggler_is_a_slow_device_whose_training_and_evaluation_take_longer():
    cfg = make_config(slow_client_fraction=1.0, slow_client_slowdown=3.0, local_epochs=1)
    client = client_for(cfg, {"partition-id": 0, "num-partitions": 4})
    assert client.inner.slowdown == 3.0  # inside the TimedClient
    weights = client.get_parameters({})
    _, _, metrics = client.fit(weights, round_config(cfg, 1))
    assert metrics["train_seconds"] > 0
    # The slowdown acts where the work runs: the trainer's own clock sees it.
    settings = DataSettings.from_config(cfg)
    train = TrainSettings.from_config(cfg)
    trainer, data = trainer_for(train, data_spec(settings)), load_partition(settings, 0, 4).train
    trainer.fit(data, epochs=1, batch_size=8)  # traced outside the timed calls
    fit_seconds: dict[float, list[float]] = {1.0: [], 10.0: []}
    eval_seconds: dict[float, list[float]] = {1.0: [], 10.0: []}
    for _ in range(3):  # interleaved, the fastest of each: a loaded machine slows both
        for slowdown in (1.0, 10.0):
            fit_seconds[slowdown].append(
                trainer.fit(data, epochs=2, batch_size=8, slowdown=slowdown).seconds)
            started = time.perf_counter()
            trainer.evaluate(data, slowdown=slowdown)
            eval_seconds[slowdown].append(time.perf_counter() - started)
    assert min(fit_seconds[10.0]) >= 5.0 * min(fit_seconds[1.0])  # 10x expected
    assert min(eval_seconds[10.0]) >= 5.0 * min(eval_seconds[1.0])
    trainer.forget()


def test_node_config_slowdown_makes_a_slow_node_and_is_checked():
    cfg = make_config()
    honest = client_for(cfg, {"partition-id": 0, "num-partitions": 4}).inner
    settings = FaultSettings.from_config(cfg)
    assert with_faults(honest, settings, {"slowdown": 1}) is honest and honest.slowdown == 1.0
    slow = with_faults(honest, settings, {"slowdown": 4.0})
    assert slow is honest and slow.slowdown == 4.0
    for bad in (0.5, "fast", True):
        with pytest.raises(ConfigError, match="node-config key 'slowdown'"):
            node_slowdown({"slowdown": bad})


def test_run_simulation_refuses_fedbuff_with_dp_before_starting(capsys):
    from fl_app.cli import simulate

    code = simulate.main(["--num-supernodes", "4",
                          "--run-config", "server-loop='fedbuff' strategy='dp-fixed'"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "'server-loop'='fedbuff'" in err and "'strategy'='dp-fixed'" in err


@pytest.mark.parametrize("key, value", [("compress-up", "int8"), ("compress-down", "fp16"),
                                        ("homomorphic-encryption", "ckks")])
def test_fedbuff_refuses_codecs_and_encryption_it_would_bypass(key, value):
    with pytest.raises(ConfigError, match=f"'server-loop'='fedbuff' and '{key}'"):
        make_config(server_loop="fedbuff", **{key.replace("-", "_"): value})
