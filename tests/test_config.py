"""The run-config schema: defaults, bad values, and the two entry points agreeing."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from flwr.common.config import get_fused_config_from_dir, parse_config_args

import run_simulation
from fl_app.app.config import all_settings, defaults, resolve
from fl_app.cli import simulate
from fl_app.schema import ConfigError
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_resolve_and_cover_every_key():
    cfg = resolve({})
    assert dict(cfg) == defaults()
    assert set(cfg) == set(all_settings())


@pytest.mark.parametrize("raw, key, hint", [
    ({"no-such-key": 1}, "no-such-key", "[tool.flwr.app.config]"),
    ({"num-server-rounds": "ten"}, "num-server-rounds", "type int"),
    ({"accept-failures": 1}, "accept-failures", "type bool"),
    ({"learning-rate": "fast"}, "learning-rate", "type float"),
    ({"fraction-fit": 1.5}, "fraction-fit", "<= 1.0"),
    ({"fraction-fit": 0.0}, "fraction-fit", "0.0 <"),
    ({"local-epochs": 0}, "local-epochs", "1 <="),
    ({"learning-rate": float("nan")}, "learning-rate", "out of range"),
    ({"strategy": "fedsgd"}, "strategy", "'weighted-fedavg'"),
    ({"model": "resnet"}, "model", "'mlp'"),
    ({"dataset": "imagenet"}, "dataset", "'digits'"),
    ({"partitioner": "random"}, "partitioner", "'dirichlet'"),
    ({"min-fit-clients": 5, "min-available-clients": 2}, "min-fit-clients", "must not exceed"),
    ({"dataset": "hf:"}, "dataset", "'hf:<hub id>'"),
    ({"dataset": "hf: "}, "dataset", "'hf:<hub id>'"),
    ({"fault-raise-fraction": 0.7, "fault-nan-fraction": 0.7}, "fault-nan-fraction",
     "at most 1"),
    ({"fault-raise-fraction": 0.6, "attack": "scale", "attack-fraction": 0.5},
     "attack-fraction", "add up to 1.1"),
    ({"validation-fraction": 0.0}, "validation-fraction", "'fraction-evaluate' is 1.0"),
    ({"fuse-evaluate": True, "server-loop": "fedbuff"}, "fuse-evaluate", "'fedbuff'"),
    ({"fuse-evaluate": True, "monitor": "distributed_accuracy"}, "fuse-evaluate",
     "a round late"),
])
def test_bad_values_fail_naming_the_key_and_what_is_allowed(raw, key, hint):
    with pytest.raises(ConfigError) as err:
        resolve(raw)
    assert f"'{key}'" in str(err.value)
    assert hint in str(err.value)


@pytest.mark.parametrize("raw, suggestion", [
    ({"num-server-round": 3}, "num-server-rounds"),
    ({"local-epoch": 2}, "local-epochs"),
    ({"strategy": "fedavgg"}, "fedavg"),
    ({"strategy": "fedprox "}, "fedprox"),
    ({"dp-inner": "weighted-fedav"}, "weighted-fedavg"),
    ({"dataset": "digts"}, "digits"),
    ({"model": "mpl"}, "mlp"),
    ({"partitioner": "dirichlet-"}, "dirichlet"),
    ({"optimizer": "adm"}, "adam"),
    ({"attack": "scal"}, "scale"),
    ({"mode": "maxx"}, "max"),
])
def test_misspelt_keys_and_names_get_one_suggestion(raw, suggestion):
    with pytest.raises(ConfigError) as err:
        resolve(raw)
    message = str(err.value)
    assert f"did you mean {suggestion!r}?" in message
    assert message.count("did you mean") == 1 and "' or '" not in message.split("mean")[1]


def test_an_unknown_key_lists_not_every_key_but_where_they_are():
    with pytest.raises(ConfigError) as err:
        resolve({"num-server-round": 3, "zzz-qqq": 1})
    message = str(err.value)
    assert "unknown run-config key 'num-server-round'; did you mean 'num-server-rounds'?" in message
    assert "unknown run-config key 'zzz-qqq' (" in message  # nothing close: no suggestion
    assert "'seed'" not in message and "fedprox-mu" not in message
    assert "[tool.flwr.app.config]" in message and "\n" not in message


def test_accepted_values_are_typed():
    cfg = make_config(learning_rate=1, model="my/model.keras", dataset="hf:some/dataset")
    assert cfg["learning-rate"] == 1.0 and isinstance(cfg["learning-rate"], float)
    assert cfg["model"] == "my/model.keras"


def test_accepted_combinations_of_keys():
    # attack-fraction counts only when an attack is configured
    make_config(fault_raise_fraction=0.6, attack_fraction=0.5)
    make_config(fault_raise_fraction=0.5, fault_nan_fraction=0.5)
    make_config(validation_fraction=0.0, fraction_evaluate=0.0)


@pytest.mark.parametrize("module", ["strategies.weighted_fedavg", "fl_app.server.settings"])
def test_a_modules_check_config_runs_in_resolve(monkeypatch, module):
    seen = []

    def check_config(values):
        seen.append(dict(values))
        if values["local-epochs"] > 3:
            raise ConfigError("run-config key 'local-epochs' is too large for this check")

    monkeypatch.setattr(importlib.import_module(module), "check_config", check_config,
                        raising=False)
    make_config(local_epochs=2)
    assert set(seen[-1]) == set(all_settings())  # it sees every key, defaults included
    with pytest.raises(ConfigError, match="'local-epochs' is too large"):
        make_config(local_epochs=4)


def test_pyproject_and_readme_are_in_sync_with_the_schema():
    result = subprocess.run([sys.executable, "scripts/sync_config.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_run_simulation_resolves_the_same_config_as_flwr_run():
    overrides = "strategy='fedprox' local-epochs=2 learning-rate=0.05 partitioner='dirichlet'"
    via_flwr = resolve(get_fused_config_from_dir(ROOT, parse_config_args([overrides])))
    via_script = simulate.load_run_config(overrides)
    assert via_flwr == via_script
    assert via_script["strategy"] == "fedprox" and via_script["local-epochs"] == 2


def test_run_simulation_rejects_bad_config_before_training(capsys, tmp_path):
    code = run_simulation.main(["--run-config", "fraction-fit=2.0", "--out", str(tmp_path)])
    assert code == 2
    assert "'fraction-fit'" in capsys.readouterr().err
    assert not (tmp_path / "history.json").exists()


def test_run_simulation_rejects_a_malformed_run_config_string(capsys, tmp_path):
    code = run_simulation.main(["--run-config", "local-epochs=[1", "--out", str(tmp_path)])
    assert code == 2
    assert capsys.readouterr().err.startswith("error: --run-config 'local-epochs=[1' cannot be")
