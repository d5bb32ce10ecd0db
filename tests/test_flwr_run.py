"""`flwr run .` on a real SuperLink in simulation mode, started and stopped by the test.

The SuperLink runs with `--disable-runtime-dependency-installation` (this venv already has
the app's dependencies) on a free port of 127.0.0.1 (the tests start once it listens); the
connection lives in a temporary FLWR_HOME. Every process is stopped by pid at the end,
pass or fail.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from deploy.commands import Command
from deploy.launch import start_listening
from deploy.processes import Supervisor

pytestmark = pytest.mark.slow  # runs Flower simulations or real processes

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def simulation_superlink(tmp_path_factory):
    """A simulation-mode SuperLink with 10 simulated SuperNodes and a `flwr` home for it."""
    home = tmp_path_factory.mktemp("flwr-home")
    env = {"FLWR_HOME": str(home)}

    def superlink(port: int) -> Command:
        return Command([str(BIN / "flower-superlink"), "--insecure", "--simulation",
                        "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
                        "--disable-runtime-dependency-installation"], env)

    with Supervisor(home / "logs", echo=None) as supervisor:
        _, port = start_listening(supervisor, "superlink", superlink)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{port}"\n'
            'insecure = true\noptions.num-supernodes = 10\n')
        yield supervisor, env
    assert not supervisor.alive()  # a survivor would also have raised ProcessesLeft


SECAGG = "secure-aggregation='secagg+' examples-cap-factor=0"


@pytest.mark.parametrize("overrides", ["", "strategy='fedprox'",
                                       "strategy='dp-client-fixed' noise-multiplier=0.5",
                                       f"strategy='weighted-fedavg' {SECAGG}",
                                       f"strategy='dp-client-fixed' noise-multiplier=0.5 {SECAGG}"])
def test_flwr_run_completes_with_the_app_config(simulation_superlink, tmp_path, overrides):
    supervisor, env = simulation_superlink
    out = tmp_path / "out"
    run_config = f"num-server-rounds=3 out-dir='{out}' {overrides}"
    cli = supervisor.run(f"flwr-run-{len(overrides)}", Command(
        [str(BIN / "flwr"), "run", ".", "test", "--stream", "--run-config", run_config], env),
        timeout=400, cwd=ROOT)
    assert cli.popen.returncode == 0, cli.log_text()[-3000:]
    history = json.loads((out / "history.json").read_text())
    assert history["stopped"] == "num-server-rounds"
    assert history["config"]["strategy"] == (overrides.split("'")[1] if overrides
                                             else "weighted-fedavg")
    accuracy = [r["centralized"]["accuracy"] for r in history["rounds"]]
    assert len(accuracy) == 4 and accuracy[-1] > accuracy[0] + 0.3
    assert all(r["fit"]["num_clients"] == 10 for r in history["rounds"][1:])
    assert (out / "final_model.keras").is_file()
    if "dp-" in overrides:  # privacy is accounted for and recorded every round
        epsilons = [r["privacy"]["epsilon"] for r in history["rounds"][1:]]
        assert 0 < epsilons[0] < epsilons[1] < epsilons[2]
        assert all(r["fit"]["dp_clip_norm"] == 1.0 for r in history["rounds"][1:])
    if SECAGG in overrides:  # every fit round ran SecAgg+; with DP the clients added the noise
        assert history["config"]["secure-aggregation"] == "secagg+"
        if "dp-" in overrides:
            assert all(r["fit"]["dp_server_noise_std"] == 0.0 for r in history["rounds"][1:])


def test_flwr_run_trains_a_users_regression_model_on_diabetes(simulation_superlink, tmp_path):
    """The tutorials' regression model (Adam(0.01), mse), named as `module:function`, on the
    embedded diabetes data: its compiled loss and metric are what the run records."""
    supervisor, env = simulation_superlink
    out = tmp_path / "out"
    run_config = (f"num-server-rounds=5 out-dir='{out}' dataset='diabetes' "
                  "model='examples.keras_models:regression'")
    cli = supervisor.run("flwr-run-regression", Command(
        [str(BIN / "flwr"), "run", ".", "test", "--stream", "--run-config", run_config], env),
        timeout=400, cwd=ROOT)
    assert cli.popen.returncode == 0, cli.log_text()[-3000:]
    history = json.loads((out / "history.json").read_text())
    mse = [r["centralized"]["loss"] for r in history["rounds"]]
    assert set(history["rounds"][-1]["centralized"]) == {"loss", "mae"}
    assert len(mse) == 6 and mse[-1] < 0.7 * mse[0]  # standardized target: 0.87 -> 0.52
    assert all(r["fit"]["num_clients"] == 10 for r in history["rounds"][1:])
