"""Per-node local work: node-config overrides, local-epochs-range, the time budget, and the
steps a client reports (FedNova's tau)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import run_simulation
from fl_app.app.local_client import client_for
from fl_app.client.local_work import (
    NodeWork,
    WorkSettings,
    drawn_epochs,
    parse_sim_node_config,
    work_for,
)
from fl_app.data.sources import data_spec, load_partition
from fl_app.data.types import DataSettings
from fl_app.ml.trainer import TrainSettings, trainer_for
from fl_app.schema import ConfigError
from fl_app.wire import KEY_LOCAL_STEPS, KEY_STRAGGLER_EPOCHS, round_config
from tests.conftest import make_config

DEFAULTS = {"local-epochs": 5, "batch-size": 16}


def test_node_config_wins_over_the_round_and_a_straggler_instruction_wins_over_both():
    work = NodeWork(epochs=2, batch_size=8)
    assert work.plan({"local-epochs": 7, "batch-size": 32}, DEFAULTS) == (2, 8, None)
    assert NodeWork().plan({"local-epochs": 7}, DEFAULTS) == (7, 16, None)
    assert work.plan({"local-epochs": 7, KEY_STRAGGLER_EPOCHS: 3}, DEFAULTS) == (3, 8, None)


def test_a_time_budget_replaces_the_epochs_unless_the_node_caps_them():
    assert NodeWork(time_budget=1.5).plan({"local-epochs": 7}, DEFAULTS) == (None, 16, 1.5)
    assert NodeWork(epochs=4, time_budget=1.5).plan({}, DEFAULTS) == (4, 16, 1.5)


@pytest.mark.parametrize("node_config, message", [
    ({"local-epochs": 0}, "'local-epochs' must be a positive integer"),
    ({"batch-size": 2.5}, "'batch-size' must be a positive integer"),
    ({"time-budget": "soon"}, "'time-budget' must be a positive number of seconds"),
    ({"time-budget": -1.0}, "'time-budget' must be a positive number of seconds"),
])
def test_bad_node_config_values_are_named(node_config, message):
    with pytest.raises(ConfigError, match=message) as err:
        work_for(WorkSettings.from_config(make_config()), node_config, 0, "node-config of node 7")
    assert "node 7" in str(err.value)


def test_sim_node_config_gives_partitions_their_own_node_config():
    cfg = make_config(sim_node_config="0: local-epochs=2 batch-size=8; 3: time-budget=1.5")
    assert parse_sim_node_config(cfg["sim-node-config"]) == {
        0: {"local-epochs": 2, "batch-size": 8}, 3: {"time-budget": 1.5}}
    work = WorkSettings.from_config(cfg)
    assert work_for(work, {"partition-id": 3, "num-partitions": 4}, 3, "p3") == NodeWork(
        time_budget=1.5)
    assert work_for(work, {"partition-id": 1, "num-partitions": 4}, 1, "p1") == NodeWork()


@pytest.mark.parametrize("text, message", [
    ("zero: local-epochs=2", "must look like"),
    ("0: data-path='/etc/passwd'", "'data-path' cannot be set here"),
    ("0: local-epochs=-2", "'local-epochs' must be a positive integer"),
])
def test_bad_sim_node_config_stops_the_run_before_training(text, message):
    with pytest.raises(ConfigError, match=message):
        make_config(sim_node_config=text)


def test_local_epochs_range_draws_a_fixed_number_per_client_within_the_range():
    work = WorkSettings.from_config(make_config(local_epochs_range="1-10"))
    draws = [drawn_epochs(work, key) for key in range(200)]
    assert draws == [drawn_epochs(work, key) for key in range(200)]  # fixed per client
    assert min(draws) == 1 and max(draws) == 10  # P(a value missing) < 200 * 0.9**200
    assert drawn_epochs(WorkSettings.from_config(make_config()), 0) is None
    node_own = work_for(work, {"partition-id": 0, "local-epochs": 3}, 0, "p0")
    assert node_own.epochs == 3  # the node's own node-config wins over the drawn number
    with pytest.raises(ConfigError, match="local-epochs-range"):
        make_config(local_epochs_range="10-1")


def _digits_trainer():
    cfg = make_config()
    settings = DataSettings.from_config(cfg)
    train = TrainSettings.from_config(cfg)
    return trainer_for(train, data_spec(settings)), load_partition(settings, 0, 4).train


def test_fit_reports_its_steps():
    trainer, data = _digits_trainer()
    result = trainer.fit(data, epochs=3, batch_size=10)
    assert result.steps == 3 * math.ceil(len(data) / 10)


def test_time_budget_stops_training_and_reports_the_steps_done():
    trainer, data = _digits_trainer()
    trainer.fit(data, epochs=1, batch_size=4)  # compile outside the measured calls
    steps_per_epoch = math.ceil(len(data) / 4)
    short = trainer.fit(data, epochs=None, batch_size=4, time_budget=0.3)
    long = trainer.fit(data, epochs=None, batch_size=4, time_budget=1.2)
    assert 1 <= short.steps < long.steps
    assert 1.2 <= long.seconds < 1.2 + 3.0  # stops near the budget (slack for a loaded machine)
    assert np.isfinite(long.loss) and "accuracy" in long.metrics
    capped = trainer.fit(data, epochs=2, batch_size=4, time_budget=60.0)
    assert capped.steps == 2 * steps_per_epoch and capped.seconds < 30


def test_client_reports_local_steps_from_its_node_config():
    cfg = make_config()
    client = client_for(cfg, {"partition-id": 0, "num-partitions": 4, "local-epochs": 2,
                              "batch-size": 7})
    _, n, metrics = client.fit(client.get_parameters({}), round_config(cfg, 1))
    assert metrics[KEY_LOCAL_STEPS] == 2 * math.ceil(n / 7)


@pytest.mark.slow  # runs a Flower simulation
def test_per_node_overrides_reach_the_trainer_in_a_simulation(tmp_path):
    overrides = ("num-server-rounds=1 fraction-evaluate=0.0 local-epochs=1 batch-size=16 "
                 "sim-node-config='0: local-epochs=3 batch-size=5; 1: batch-size=9'")
    code = run_simulation.main(["--num-supernodes", "2", "--run-config", overrides,
                                "--out", str(tmp_path)])
    assert code == 0
    history = json.loads((tmp_path / "history.json").read_text())
    cfg = make_config(local_epochs=1, batch_size=16, fraction_evaluate=0.0)
    sizes = [len(load_partition(DataSettings.from_config(cfg), pid, 2).train) for pid in (0, 1)]
    steps = [3 * math.ceil(sizes[0] / 5), 1 * math.ceil(sizes[1] / 9)]
    expected = sum(n * s for n, s in zip(sizes, steps)) / sum(sizes)  # weighted fit metric
    assert history["rounds"][1]["fit"][KEY_LOCAL_STEPS] == pytest.approx(expected)
