"""End-to-end runs on Flower's simulation engine through run_simulation.py."""

from __future__ import annotations

import json
import math

import pytest

import run_simulation
from fl_app.cli.summary import print_summary
from strategies.registry import strategy_names

pytestmark = pytest.mark.slow  # runs Flower simulations or real processes

FAST = "num-server-rounds=2 local-epochs=2 min-fit-clients=3 min-available-clients=3"


def _run(tmp_path, run_config: str, num_supernodes: int = 4) -> dict:
    code = run_simulation.main(["--num-supernodes", str(num_supernodes), "--run-config",
                                run_config, "--out", str(tmp_path)])
    assert code == 0
    return json.loads((tmp_path / "history.json").read_text())


def test_every_registered_strategy_completes_a_short_run_on_the_simulation_engine(tmp_path):
    """Each registered strategy runs the app's server loop (`serve`, its own resolved config,
    records and outputs) for two rounds, one after another in one ServerApp on Flower's
    simulation engine: real messages to the app's ClientApp on Ray workers, one engine
    start for all of them instead of one per strategy."""
    from flwr.server import ServerApp
    from flwr.simulation import run_simulation

    from fl_app.app.client_app import make_client_app
    from fl_app.app.server_app import serve
    from fl_app.cli.simulate import backend_config, parse_args, prepare, simulation_ray

    def args(name: str):
        return parse_args(["--num-supernodes", "4", "--out", str(tmp_path / name),
                           "--run-config", f"{FAST} strategy='{name}'"])

    configs = {name: prepare(args(name)) for name in strategy_names()}
    errors: dict[str, str] = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context) -> None:
        for name, cfg in configs.items():
            try:
                serve(grid, context, cfg)
            except Exception as err:  # noqa: BLE001  (reported per strategy below)
                errors[name] = repr(err)

    first = args("weighted-fedavg")
    with simulation_ray(first, verbose=False):
        run_simulation(server_app=server_app,
                       client_app=make_client_app(configs["weighted-fedavg"]),
                       num_supernodes=4, backend_config=backend_config(first))
    assert errors == {}
    for name in configs:
        history = json.loads((tmp_path / name / "history.json").read_text())
        assert history["config"]["strategy"] == name
        assert [r["round"] for r in history["rounds"]] == [0, 1, 2], name
        assert history["stopped"] == "num-server-rounds", name
        for record in history["rounds"][1:]:
            assert record["fit"]["num_clients"] == 4, name
            assert record["fit"]["num_failures"] == 0, name
            assert math.isfinite(record["centralized"]["loss"]), name
        assert (tmp_path / name / "final_model.keras").is_file(), name
        assert (tmp_path / name / "accuracy.png").is_file(), name
        assert (tmp_path / name / "loss.png").is_file(), name


def test_default_workload_learns_and_stops_at_target_accuracy(tmp_path):
    history = _run(tmp_path, "target=0.8 num-server-rounds=15", num_supernodes=10)
    accuracies = [r["centralized"]["accuracy"] for r in history["rounds"]]
    assert history["stopped"] == "target"
    assert accuracies[-1] >= 0.8 > max(accuracies[:-1])
    assert len(accuracies) - 1 < 15
    assert {"round", "seconds", "centralized", "distributed", "fit"} <= set(history["rounds"][1])


def test_same_seed_same_run_even_when_sampling_a_fraction(tmp_path):
    """Node ids are random per run; sampling by the clients' stable keys makes runs repeat."""
    config = "num-server-rounds=2 fraction-fit=0.6 local-epochs=1 min-fit-clients=2"
    first = _run(tmp_path / "a", config, num_supernodes=5)
    second = _run(tmp_path / "b", config, num_supernodes=5)
    assert [r["centralized"] for r in first["rounds"]] == [r["centralized"] for r in
                                                            second["rounds"]]
    assert all(r["fit"]["num_clients"] == 3 for r in first["rounds"][1:])


@pytest.mark.parametrize("privacy", [False, True])
def test_summary_shows_epsilon_only_for_private_runs(tmp_path, capsys, privacy):
    record = {"round": 1, "seconds": 0.5, "fit": {"num_clients": 3, "num_failures": 0,
                                                   "num_rejected": 1},
              "centralized": {"loss": 0.4, "accuracy": 0.875}}
    if privacy:
        record["privacy"] = {"epsilon": 2.5, "delta": 1e-5}
    history = {"rounds": [{"round": 0, "seconds": 0.0, "centralized": {"loss": 2.3,
                                                                       "accuracy": 0.1}},
                          record], "stopped": "num-server-rounds"}
    (tmp_path / "history.json").write_text(json.dumps(history))
    print_summary(tmp_path, 12.0)
    out = capsys.readouterr().out
    assert "0.8750" in out and "stopped: num-server-rounds" in out
    assert ("ε" in out and "2.500" in out) == privacy
    assert "distributed" not in out  # no round had distributed evaluation


def test_fused_evaluation_records_what_separate_evaluate_messages_gave(tmp_path):
    """`fuse-evaluate=true`: no evaluate messages; round r's distributed record is round
    r-1's model evaluated by the same clients, equal to the separate evaluation of that
    model (up to the order float32 sums arrive in), and the training is unchanged."""
    config = "num-server-rounds=3 local-epochs=1"
    separate = _run(tmp_path / "separate", config)["rounds"]
    fused = _run(tmp_path / "fused", f"{config} fuse-evaluate=true")["rounds"]
    for a, b in zip(fused, separate):  # the same training (the updates arrive in another order)
        assert a["centralized"] == pytest.approx(b["centralized"], rel=1e-5)
    assert "distributed" in fused[1]  # round 1 evaluated the initial model
    for before, after in zip(separate[1:-1], fused[2:]):
        assert set(after["distributed"]) == set(before["distributed"])
        for key, value in before["distributed"].items():
            assert after["distributed"][key] == pytest.approx(value, rel=1e-4), key
