"""run_simulation.py's CLI: the config is checked against --num-supernodes before Flower
starts, and errors from setting up the run reach the user as one line, not a traceback."""

from __future__ import annotations

import pytest

from fl_app.app.config import check_num_clients
from fl_app.cli import simulate
from fl_app.data.sources import DataError
from fl_app.ml.errors import ModelError
from fl_app.schema import ConfigError
from fl_app.server.checkpoint import CheckpointError
from tests.conftest import make_config


def _flower_must_not_start(cfg, args, **_):
    raise AssertionError("the simulation started despite a config that cannot run")


@pytest.mark.parametrize("run_config, keys", [
    ("min-fit-clients=4 min-available-clients=4", ["min-fit-clients", "min-available-clients"]),
    ("min-evaluate-clients=5", ["min-evaluate-clients"]),
    ("dataset='synthetic' synthetic-num-users=5", ["synthetic-num-users"]),
    ("fault-raise-fraction=0.5 fault-nan-fraction=0.5", ["fault-raise-fraction"]),
    ("monitor='mae'", ["monitor"]),  # digits' classifier records accuracy and loss, no mae
])
def test_config_that_cannot_run_on_the_supernodes_exits_2_naming_the_key(
        monkeypatch, capsys, tmp_path, run_config, keys):
    monkeypatch.setattr(simulate, "simulate", _flower_must_not_start)
    code = simulate.main(["--num-supernodes", "3", "--run-config", run_config,
                                "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ")
    assert all(f"'{key}'" in err for key in keys)


def test_configs_that_fit_the_clients_pass():
    check_num_clients(make_config(min_fit_clients=3, min_available_clients=3), 3)
    check_num_clients(make_config(dataset="synthetic", synthetic_num_users=3), 3)
    check_num_clients(make_config(fault_raise_fraction=0.34, fault_nan_fraction=0.34), 3)
    # without distributed evaluation, min-evaluate-clients is never used
    check_num_clients(make_config(min_evaluate_clients=5, fraction_evaluate=0.0), 3)


@pytest.mark.parametrize("run_config, message", [
    ("model='examples.keras_models:regression'",
     "error: model 'examples.keras_models:regression' outputs 1 value(s) per example but the "
     "dataset is a 10-class classification"),
    ("model='examples.keras_models:missing'",
     "error: run-config key 'model': module examples.keras_models has no function 'missing'"),
    ("model='/nowhere/model.keras'",
     "error: run-config key 'model': file /nowhere/model.keras does not exist"),
])
def test_a_model_that_cannot_train_on_the_data_exits_2_before_flower_starts(
        monkeypatch, capsys, tmp_path, run_config, message):
    monkeypatch.setattr(simulate, "simulate", _flower_must_not_start)
    code = simulate.main(["--run-config", run_config, "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1


@pytest.mark.parametrize("error", [DataError, ConfigError, CheckpointError, ModelError])
def test_errors_while_running_are_one_line(monkeypatch, capsys, tmp_path, error):
    def fail(cfg, args, **_):
        raise error("dataset 'mnist' could not be loaded")

    monkeypatch.setattr(simulate, "simulate", fail)
    assert simulate.main(["--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: dataset 'mnist' could not be loaded\n"


def test_check_reports_ok_or_one_error_line_and_trains_nothing(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(simulate, "simulate", _flower_must_not_start)
    assert simulate.main(["--check", "--run-config", f"out-dir='{tmp_path / 'out'}'"]) == 0
    assert capsys.readouterr().out == "ok: the config, model and data fit 10 clients\n"
    assert not (tmp_path / "out").exists()
    assert simulate.main(["--check", "--run-config", "strategy='fedavgg'"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run-config key 'strategy' has invalid value 'fedavgg'")
    assert err.endswith("did you mean 'fedavg'?\n") and err.count("\n") == 1


def test_a_ray_without_its_loopback_switch_is_refused_with_a_clear_error(monkeypatch):
    """`loopback_only_ray` sets a private Ray constant: a Ray without it is named, and the
    simulation does not start (it could listen beyond 127.0.0.1)."""
    from ray._private import ray_constants

    monkeypatch.delattr(ray_constants, "ENABLE_RAY_CLUSTER")
    with pytest.raises(RuntimeError, match=r"Ray \S+ has no .*ENABLE_RAY_CLUSTER.*127\.0\.0\.1: "
                       "not started"):
        with simulate.loopback_only_ray():
            raise AssertionError("entered without the switch")
