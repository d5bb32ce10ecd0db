"""Adaptive local work (`round-time-budget`): the plan follows the budget and the node's
measured speed, the rate is scaled for the call and restored, the measurement persists in
the node's state, and with the option off every node trains its fixed epochs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.common import ConfigRecord, RecordDict

from fl_app.app.local_client import client_for
from fl_app.client.adaptive_work import STATE_KEY, StepCost, plan
from fl_app.data.sources import load_partition
from fl_app.data.types import DataSettings
from fl_app.schema import ConfigError
from fl_app.wire import KEY_BATCH_SIZE, KEY_LOCAL_STEPS, KEY_LR_SCALE, round_config
from scripts.bench.common import run_history
from strategies.fednova import FedNova
from tests.conftest import make_config
from tests.flower_objects import fit_res

NODE = {"partition-id": 0, "num-partitions": 4}


def test_the_plan_fills_the_budget_a_slow_node_doing_fewer_steps():
    fast, slow = StepCost(0.001, 0.0001), StepCost(0.01, 0.001)  # 10x slower
    quick, sluggish = plan(fast, 1.0, 16, 1000), plan(slow, 1.0, 16, 1000)
    assert quick.steps > sluggish.steps >= 1
    for cost, chosen in ((fast, quick), (slow, sluggish)):
        assert chosen.steps * cost.seconds(chosen.batch_size) <= 1.0
        assert (chosen.steps + 1) * cost.seconds(chosen.batch_size) > 1.0  # as many as fit
        assert chosen.lr_scale == chosen.batch_size / 16
    # No more than the data, no less than one step however short the budget.
    tiny = plan(slow, 1e-6, 16, 10)
    assert tiny.steps == 1 and tiny.batch_size <= 10


def test_the_plan_picks_the_batch_that_does_the_most_examples_in_enough_steps():
    overhead_bound = StepCost(0.01, 0.0)  # a step costs the same at any batch: the largest
    assert plan(overhead_bound, 1.0, 16, 1000).batch_size == 64
    example_bound = StepCost(0.0, 2.0 ** -10)  # as many examples at any batch: the base one
    assert plan(example_bound, 1.0, 16, 1000).batch_size == 16
    # Batches of 64 (0.5 s a step) and 32 (0.3 s) leave 2 and 3 steps, fewer than MIN_STEPS:
    # 16 (0.2 s) does the most examples in 5 steps.
    chosen = plan(StepCost(0.1, 0.00625), 1.0, 16, 1000)
    assert (chosen.batch_size, chosen.steps) == (16, 5)


def _fit(client, cfg, server_round=1):
    return client.fit(client.get_parameters({}), round_config(cfg, server_round))


def test_a_slow_node_does_less_work_in_the_same_budget_and_reports_its_choice():
    cfg = make_config(round_time_budget=0.3)
    work = {}
    for slowdown in (1.0, 10.0):
        client = client_for(cfg, {**NODE, "slowdown": slowdown}, state=RecordDict())
        _fit(client, cfg)  # measures; the second round plans on a warm trainer
        _, _, metrics = _fit(client, cfg, 2)
        assert metrics[KEY_LR_SCALE] == metrics[KEY_BATCH_SIZE] / cfg["batch-size"]
        work[slowdown] = metrics[KEY_LOCAL_STEPS] * metrics[KEY_BATCH_SIZE]
    assert work[10.0] < work[1.0] / 2  # 10x expected


def test_state_carries_the_measurement_and_the_plan_follows_it():
    cfg = make_config(round_time_budget=0.5)
    state = RecordDict()
    _fit(client_for(cfg, NODE, state=state), cfg)
    assert set(state.config_records[STATE_KEY]) == {"overhead", "per-example"}
    # A node whose state says a step costs 0.1 s plans 5 steps of a new client's fit
    # (built per message, as a ClientApp does): it reads the state, it does not measure.
    state.config_records[STATE_KEY] = ConfigRecord({"overhead": 0.1, "per-example": 0.0})
    _, _, metrics = _fit(client_for(cfg, NODE, state=state), cfg, 2)
    assert metrics[KEY_LOCAL_STEPS] == 5 and metrics[KEY_BATCH_SIZE] == 4 * cfg["batch-size"]
    assert state.config_records[STATE_KEY]["overhead"] < 0.1  # rescaled to the real speed


def test_the_scaled_rate_trains_and_the_optimizer_rate_is_restored():
    cfg = make_config(round_time_budget=0.5, learning_rate=0.05)
    state = RecordDict({STATE_KEY: ConfigRecord({"overhead": 0.1, "per-example": 0.0})})
    client = client_for(cfg, NODE, state=state)
    trainer = client.inner.trainer
    before = trainer.base_learning_rate()
    weights = client.get_parameters({})
    trained, _, metrics = client.fit(weights, round_config(cfg, 1))
    assert trainer.base_learning_rate() == before
    assert metrics[KEY_LR_SCALE] == 4.0
    # The same plan by hand: 5 steps at batch 4b and 4x the rate, the client's seed.
    trainer.set_weights(weights)
    data = load_partition(DataSettings.from_config(cfg), 0, 4).train
    trainer.fit(data, epochs=None, steps=5, batch_size=4 * cfg["batch-size"],
                learning_rate=0.2, seed=[cfg["seed"], 1, 0])
    by_hand = trainer.get_weights()
    trainer.forget()
    for a, b in zip(trained, by_hand):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_off_by_default_every_node_trains_its_fixed_epochs():
    cfg = make_config(local_epochs=2, batch_size=8)
    assert cfg["round-time-budget"] == 0.0
    client = client_for(cfg, {**NODE, "slowdown": 10.0}, state=RecordDict())
    _, n, metrics = _fit(client, cfg)
    assert metrics[KEY_LOCAL_STEPS] == 2 * math.ceil(n / 8)
    assert KEY_BATCH_SIZE not in metrics and KEY_LR_SCALE not in metrics


def test_a_node_time_budget_wins_over_the_round_budget():
    cfg = make_config(round_time_budget=5.0)
    state = RecordDict()
    _, _, metrics = _fit(client_for(cfg, {**NODE, "time-budget": 0.2}, state=state), cfg)
    assert KEY_BATCH_SIZE not in metrics and STATE_KEY not in state.config_records


@pytest.mark.parametrize("overrides, message", [
    ({"round_time_budget": -1.0}, "'round-time-budget'"),
    ({"round_time_budget": 1.0, "local_epochs_range": "1-3"}, "'local-epochs-range'"),
    ({"round_time_budget": 1.0, "straggler_fraction": 0.5}, "'straggler-fraction'"),
])
def test_bad_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        make_config(**overrides)


def test_fednova_counts_steps_at_the_base_rate():
    metrics = [{KEY_LOCAL_STEPS: 6, KEY_LR_SCALE: 4.0}, {KEY_LOCAL_STEPS: 6},
               {KEY_LOCAL_STEPS: 6, KEY_LR_SCALE: 0.25}, {KEY_LOCAL_STEPS: 6, KEY_LR_SCALE: 8.0},
               {KEY_LOCAL_STEPS: 6, KEY_LR_SCALE: float("nan")}]
    weights = [np.zeros(2, np.float32)]
    figures = [FedNova().figure(fit_res(weights, 10, m)) for m in metrics]
    assert figures == [24.0, 6.0, 1.5, None, None]


@pytest.mark.slow  # runs a Flower simulation
def test_adaptive_work_in_a_simulation_measures_once_per_node(tmp_path):
    overrides = ("num-server-rounds=2 fraction-evaluate=0.0 round-time-budget=0.3 "
                 "slow-client-fraction=0.5 slow-client-slowdown=10")
    fits = [record["fit"] for record in run_history(2, overrides, tmp_path)["rounds"][1:]]
    for fit in fits:
        assert fit[KEY_BATCH_SIZE] > 0 and fit[KEY_LOCAL_STEPS] >= 1
    # The fit message's time outside the trainer's fit: round 1's holds the measurement
    # (0.2 s or more of steps, and tracing); round 2's almost nothing, as the node's
    # context.state, which the engine keeps between rounds, has the measurement (a second
    # measurement would take as long as the first; half of it leaves room for a busy machine).
    outside = [fit["timing"]["training"] - fit["train_seconds"] for fit in fits]
    assert outside[0] > 0.2 and outside[1] < outside[0] / 2, outside
