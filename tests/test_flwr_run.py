"""`flwr run .` on a real SuperLink in simulation mode, started and stopped by the test.

The SuperLink runs with `--disable-runtime-dependency-installation` (this venv already has
the app's dependencies) on a free port of 127.0.0.1 (the tests start once it listens); the
connection lives in a temporary FLWR_HOME. Every process is stopped by pid at the end,
pass or fail.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

from deploy.commands import Command
from deploy.launch import start_listening
from deploy.processes import Supervisor
from fl_app.cli import simulate

pytestmark = pytest.mark.slow  # runs Flower simulations or real processes

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def simulation_superlink(tmp_path_factory):
    """A simulation-mode SuperLink and a `flwr` home for it (the runs ask for 10 simulated
    SuperNodes with `FEDERATION`, as the README does)."""
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
            'insecure = true\n')
        yield supervisor, env
    assert not supervisor.alive()  # a survivor would also have raised ProcessesLeft


SECAGG = "secure-aggregation='secagg+' examples-cap-factor=0"
FEDERATION = ["--federation-config", "num-supernodes=10 init-args-log-to-driver=false"]


# Other strategies, plaintext DP among them, run through the same path in tests/test_simulation.py.
@pytest.mark.parametrize("overrides", ["", f"strategy='weighted-fedavg' {SECAGG}",
                                       f"strategy='dp-client-fixed' noise-multiplier=0.5 {SECAGG}"])
def test_flwr_run_completes_with_the_app_config(simulation_superlink, tmp_path, overrides):
    supervisor, env = simulation_superlink
    out = tmp_path / "out"
    run_config = f"num-server-rounds=3 out-dir='{out}' {overrides}"
    cli = supervisor.run(f"flwr-run-{len(overrides)}", Command(
        [str(BIN / "flwr"), "run", ".", "test", "--stream", *FEDERATION,
         "--run-config", run_config], env),
        timeout=400, cwd=ROOT)
    assert cli.popen.returncode == 0, cli.log_text()[-3000:]
    log = cli.log_text()  # the streamed ServerApp log: its progress, not the libraries'
    assert "round   3/3 | 10 sampled: 10 ok, 0 failed, 0 rejected" in log, log[-3000:]
    assert not [n for n in ("configure_fit", "[SUMMARY]", "oneDNN") if n in log], log[-3000:]
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
        [str(BIN / "flwr"), "run", ".", "test", "--stream", *FEDERATION,
         "--run-config", run_config], env),
        timeout=400, cwd=ROOT)
    assert cli.popen.returncode == 0, cli.log_text()[-3000:]
    history = json.loads((out / "history.json").read_text())
    mse = [r["centralized"]["loss"] for r in history["rounds"]]
    assert set(history["rounds"][-1]["centralized"]) == {"loss", "mae"}
    assert len(mse) == 6 and mse[-1] < 0.7 * mse[0]  # standardized target: 0.87 -> 0.52
    assert all(r["fit"]["num_clients"] == 10 for r in history["rounds"][1:])


def _readme_flwr_run() -> list[str]:
    """The README's first `flwr run .` command line (the one for the default workload)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    line = next(line for line in readme.splitlines() if line.startswith("flwr run . "))
    return shlex.split(line.replace("$PWD", "PWD"))


def test_the_readmes_flwr_run_trains_ten_clients_on_a_fresh_flwr_home(tmp_path):
    """The README's command as a new user runs it: no Flower configuration yet (`flwr run`
    writes Flower's default one, whose `local` connection is the managed local SuperLink).
    The test starts that SuperLink itself, as `flwr run` would (same flags, on a free port
    that FLWR_LOCAL_SUPERLINK_HTTP_API_PORT names), because `flwr run` gives it only 15 s
    to come up, too little on a busy 2-core host; `flwr run` finds it running and uses it."""
    home, out = tmp_path / "flwr-home", tmp_path / "out"
    argv = [arg.replace("PWD/outputs/flwr", str(out)) for arg in _readme_flwr_run()]
    assert argv[:3] == ["flwr", "run", "."] and str(out) in " ".join(argv)
    env = {"FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}

    def local_superlink(port: int) -> Command:  # flwr.cli.local_superlink's command
        return Command([str(BIN / "flower-superlink"), "--insecure", "--simulation",
                        "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(port),
                        "--database", str(home / "local-superlink" / "state.db")], env)

    (home / "local-superlink").mkdir(parents=True)
    with Supervisor(tmp_path / "logs", echo=None) as supervisor:
        _, port = start_listening(supervisor, "local-superlink", local_superlink)
        cli = supervisor.run("flwr-run-readme", Command(
            [str(BIN / "flwr"), *argv[1:], "--run-config", "num-server-rounds=1"],
            {**env, "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port)}), timeout=500, cwd=ROOT)
        text = cli.log_text()
        assert cli.popen.returncode == 0, text[-3000:]
        assert "Created default configuration" in text and "(10 simulated SuperNodes)" in text
        assert not [n for n in ("configure_fit", "[SUMMARY]", "oneDNN") if n in text], text[-3000:]
    history = json.loads((out / "history.json").read_text())
    trained = history["rounds"][1]["fit"]
    assert trained["num_clients"] == 10
    assert len(trained["data_quality"]) == 10  # one report per distinct client (node id)


def _run_id(text: str) -> str:
    match = re.search(r"Successfully started run (\d+)", text)
    assert match, text[-3000:]
    return match.group(1)


@pytest.mark.parametrize("run_config, message", [
    ("num-server-rounds='three'",
     "error: run-config key 'num-server-rounds' must be of type int, got 'three' (str)"),
    ("model='/nowhere/model.keras'",
     "error: run-config key 'model': file /nowhere/model.keras does not exist"),
])
def test_a_config_or_model_error_ends_the_run_with_one_error_line(simulation_superlink, tmp_path,
                                                                  run_config, message):
    """The streamed log holds the app's one `error:` line and no traceback; Flower records
    the run as failed with the same message in its details. (`flwr run --stream` itself
    exits 0 whatever the run's end: that is Flower's, see docs/architecture.md.)"""
    supervisor, env = simulation_superlink
    cli = supervisor.run(f"flwr-run-error-{len(run_config)}", Command(
        [str(BIN / "flwr"), "run", ".", "test", "--stream", *FEDERATION, "--run-config",
         f"{run_config} out-dir='{tmp_path / 'out'}'"], env), timeout=400, cwd=ROOT)
    text = cli.log_text()
    error_lines = [line for line in text.splitlines() if "error: run-config key" in line]
    assert len(error_lines) == 1 and message in error_lines[0], text[-3000:]
    assert "Traceback" not in text
    assert not (tmp_path / "out" / "history.json").exists()  # nothing trained
    listing = supervisor.run(f"flwr-ls-{len(run_config)}", Command(
        [str(BIN / "flwr"), "list", "test", "--run-id", _run_id(text), "--format", "json"], env),
        timeout=60, cwd=ROOT).text()
    run = json.loads(listing[listing.index("{"):])["runs"][0]
    assert run["status"] == "finished:failed"
    assert message.removeprefix("error: ") in run["status-details"]


def test_an_unknown_key_is_refused_by_flower_and_named_by_the_check(simulation_superlink,
                                                                    capsys):
    """Flower's SuperLink refuses a key missing from [tool.flwr.app.config] before the app
    runs (`[code: 15] Invalid run configuration.`, exit 1); `run_simulation.py --check` with
    the same overrides names the key and the closest one."""
    supervisor, env = simulation_superlink
    cli = supervisor.run("flwr-run-unknown-key", Command(
        [str(BIN / "flwr"), "run", ".", "test", "--run-config", "num-server-round=3"], env),
        timeout=120, cwd=ROOT)
    assert cli.popen.returncode != 0 and "Invalid run configuration" in cli.log_text()
    assert simulate.main(["--check", "--run-config", "num-server-round=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown run-config key 'num-server-round'; did you mean "
                          "'num-server-rounds'?") and err.count("\n") == 1
