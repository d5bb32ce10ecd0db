"""Stopping rules like Keras' EarlyStopping: monitor, mode, min-delta, target, patience."""

from __future__ import annotations

import json
import math

import pytest

from fl_app.app.server_app import server_components
from fl_app.schema import ConfigError
from fl_app.server.stopping import StoppingRules, check_monitor, resolve_mode
from tests.conftest import make_config

NAMES = {"loss", "accuracy"}


def _record(**centralized: float) -> dict:
    """A round record whose centralized evaluation measured `centralized`."""
    return {"round": 1, "fit": {"num_clients": 3}, "centralized": centralized}


def _rounds(rules: StoppingRules, values: list[float | None], name: str) -> list[str | None]:
    """Feed one centralized value of `name` per round (None: no evaluation that round)."""
    return [rules.after_round(_record() if v is None else _record(**{name: v}))
            for v in values]


def test_max_mode_counts_only_higher_values_as_improvements():
    rules = StoppingRules("accuracy", "max", patience=2)
    assert _rounds(rules, [0.5, 0.6, 0.4, 0.55], "accuracy") == [None, None, None, "patience"]
    assert rules.best == 0.6


def test_min_mode_counts_only_lower_values_as_improvements():
    rules = StoppingRules("loss", "min", patience=2)
    assert _rounds(rules, [1.0, 0.8, 0.9], "loss") == [None, None, None]
    assert rules.best == 0.8 and rules.rounds_since_best == 1
    assert _rounds(rules, [0.7, 0.75, 0.71], "loss") == [None, None, "patience"]


def test_an_explicit_mode_overrides_the_metric_name():
    rules = StoppingRules("accuracy", "min", patience=1)
    assert _rounds(rules, [0.5, 0.4, 0.6], "accuracy") == [None, None, "patience"]


@pytest.mark.parametrize(("monitor", "names", "resolved", "mode"), [
    ("auto", NAMES, "accuracy", "max"),
    ("auto", {"loss", "mae"}, "loss", "min"),
    ("loss", NAMES, "loss", "min"),
    ("accuracy", NAMES, "accuracy", "max"),
    ("mae", {"loss", "mae"}, "mae", "min"),
    ("distributed_accuracy", NAMES, "distributed_accuracy", "max"),
    ("distributed_loss", NAMES, "distributed_loss", "min"),
])
def test_auto_resolves_monitor_and_mode_like_keras(monitor, names, resolved, mode):
    rules = StoppingRules(monitor, "auto", metric_names=names)
    assert (rules.monitor, rules.mode) == (resolved, mode)


def test_auto_mode_asks_the_metric_directions_before_the_name():
    assert resolve_mode("custom_score", "auto") == "min"
    assert resolve_mode("custom_score", "auto", {"custom_score": "up"}) == "max"
    assert resolve_mode("distributed_custom_score", "auto", {"custom_score": "up"}) == "max"
    assert resolve_mode("sparse_categorical_accuracy", "auto", {"custom_score": "up"}) == "max"
    assert resolve_mode("val_loss", "auto", {"val_loss": "up"}) == "min"  # losses go down


def test_distributed_monitor_reads_the_clients_section_not_the_centralized_one():
    rules = StoppingRules("distributed_accuracy", patience=1)
    centralized_only = _record(accuracy=0.9)
    assert rules.after_round(centralized_only) is None and rules.rounds_since_best == 0
    assert rules.after_round({"centralized": {"accuracy": 0.1},
                              "distributed": {"accuracy": 0.5}}) is None
    assert rules.best == 0.5
    assert rules.after_round({"centralized": {"accuracy": 0.95},
                              "distributed": {"accuracy": 0.4}}) == "patience"


@pytest.mark.parametrize(("mode", "values"), [("max", [0.5, 0.505, 0.509]),
                                              ("min", [1.0, 0.995, 0.991])])
def test_an_improvement_no_larger_than_min_delta_counts_as_none(mode, values):
    monitor = "accuracy" if mode == "max" else "loss"
    rules = StoppingRules(monitor, mode, patience=2, min_delta=0.01)
    assert _rounds(rules, values, monitor) == [None, None, "patience"]
    assert rules.best == values[0]


def test_an_improvement_larger_than_min_delta_resets_patience():
    rules = StoppingRules("loss", patience=2, min_delta=0.01)
    assert _rounds(rules, [1.0, 0.995, 0.98, 0.975], "loss") == [None, None, None, None]
    assert rules.best == 0.98 and rules.rounds_since_best == 1


def test_target_in_max_mode_stops_at_or_above_it():
    rules = StoppingRules("accuracy", target=0.8)
    assert _rounds(rules, [0.5, 0.79, 0.8], "accuracy") == [None, None, "target"]
    assert StoppingRules("accuracy", target=0.8).after_round(_record(accuracy=0.9)) == "target"


def test_target_in_min_mode_stops_at_or_below_it():
    rules = StoppingRules("loss", target=0.3)
    assert _rounds(rules, [1.2, 0.31, 0.3], "loss") == [None, None, "target"]
    assert StoppingRules("mae", target=0.3).after_round(_record(mae=0.1)) == "target"
    assert StoppingRules("mae", target=0.3).after_round(_record(mae=0.5)) is None


def test_target_zero_disables_the_rule():
    assert _rounds(StoppingRules("accuracy"), [0.0, 1.0], "accuracy") == [None, None]
    assert _rounds(StoppingRules("loss"), [0.0, -1.0], "loss") == [None, None]


def test_rounds_without_the_monitored_value_count_neither_way():
    rules = StoppingRules("accuracy", patience=2)
    assert _rounds(rules, [0.5, None, 0.4, None, None], "accuracy") == [None] * 5
    assert rules.rounds_since_best == 1 and rules.best == 0.5
    assert rules.after_round({"round": 3}) is None  # no sections at all
    assert rules.after_round(_record(loss=0.1)) is None  # another metric only
    assert rules.rounds_since_best == 1
    assert rules.after_round(_record(accuracy=0.45)) == "patience"


def test_missing_values_still_count_as_idle_rounds():
    rules = StoppingRules("accuracy", max_idle_rounds=2)
    assert rules.after_round({}, accepted_updates=0) is None
    assert rules.after_round({}, accepted_updates=0) == "no-client-updates"


def test_nan_is_never_an_improvement():
    rules = StoppingRules("loss", patience=1)
    assert _rounds(rules, [math.nan, 1.0, math.nan], "loss") == ["patience", None, "patience"]
    assert rules.best == 1.0


@pytest.mark.parametrize(("monitor", "mode", "no_best"), [("accuracy", "max", -math.inf),
                                                          ("loss", "min", math.inf)])
def test_state_round_trip_stores_an_infinite_best_as_none(monitor, mode, no_best):
    rules = StoppingRules(monitor, mode, patience=3)
    assert rules.after_round({}, accepted_updates=0) is None
    assert rules.best == no_best
    state = json.loads(json.dumps(rules.get_state(), allow_nan=False))
    assert state == {"best": None, "rounds_since_best": 0, "idle_rounds": 1}
    restored = StoppingRules(monitor, mode, patience=3)
    restored.best = 0.5
    restored.set_state(state)
    assert restored.best == no_best and restored.idle_rounds == 1


def test_state_round_trip_continues_patience():
    rules = StoppingRules("loss", patience=3)
    _rounds(rules, [1.0, 0.5, 0.6, 0.7], "loss")
    restored = StoppingRules("loss", patience=3)
    restored.set_state(json.loads(json.dumps(rules.get_state())))
    assert (restored.best, restored.rounds_since_best) == (0.5, 2)
    assert restored.after_round(_record(loss=0.55)) == "patience"


def test_an_old_checkpoint_state_without_newer_fields_loads():
    rules = StoppingRules(metric_names=NAMES, patience=2)
    rules.set_state({"best": 0.9, "rounds_since_best": 1})  # target-accuracy era, accuracy
    assert (rules.best, rules.rounds_since_best, rules.idle_rounds) == (0.9, 1, 0)
    assert rules.after_round(_record(loss=0.1, accuracy=0.85)) == "patience"


def test_check_monitor_accepts_auto_names_and_distributed_names():
    for monitor in ("auto", "loss", "accuracy", "distributed_loss", "distributed_accuracy"):
        check_monitor(monitor, NAMES)


@pytest.mark.parametrize(("monitor", "suggestion"), [("acuracy", "'accuracy'"),
                                                     ("distributed_acc", "'distributed_accuracy'"),
                                                     ("val_loss", "'loss'")])
def test_check_monitor_names_the_key_the_choices_and_a_suggestion(monitor, suggestion):
    with pytest.raises(ConfigError) as err:
        check_monitor(monitor, NAMES)
    message = str(err.value)
    assert "'monitor'" in message and repr(monitor) in message
    assert "'distributed_loss'" in message and "'auto'" in message
    assert message.endswith(f"did you mean {suggestion}?")


def test_check_monitor_without_a_close_name_gives_no_suggestion():
    with pytest.raises(ConfigError, match="available") as err:
        check_monitor("mae", NAMES)
    assert "did you mean" not in str(err.value)


def test_server_components_refuses_an_unknown_monitor_before_building_anything():
    with pytest.raises(ConfigError, match="did you mean 'accuracy'"):
        server_components(make_config(monitor="acuracy"))


def test_server_components_builds_the_configured_rules(tmp_path):
    cfg = make_config(monitor="distributed_loss", mode="max", patience=4, min_delta=0.5,
                      target=2.0, max_idle_rounds=5, out_dir=str(tmp_path))
    rules = server_components(cfg).server.stopping
    assert (rules.monitor, rules.mode, rules.patience, rules.min_delta, rules.target,
            rules.max_idle_rounds) == ("distributed_loss", "max", 4, 0.5, 2.0, 5)
    assert server_components(make_config(out_dir=str(tmp_path))).server.stopping.monitor == \
        "accuracy"
