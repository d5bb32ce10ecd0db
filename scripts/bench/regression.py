"""Benchmark: the regression model trained federatedly vs. centrally on the embedded diabetes data.

    python -m scripts.bench.regression [--rounds 20] [--seed 42] [--num-supernodes 10]

(a) Federated: `examples.keras_models:regression` (Dense(10, relu), Dense(1), compiled
    with Adam(0.01), loss='mse', metrics ['mae']) trains on `dataset='diabetes'` split
    IID over 10 clients, through the same entry point as `run_simulation.py`
    (`fl_app.cli.simulate.main`, `--run-config "dataset='diabetes'
    model='examples.keras_models:regression' num-server-rounds=R seed=S"`, into a
    temporary output folder); the final centralized test loss (MSE) and MAE are read from
    its history.json.
(b) Central: the same model (same builder, same seed, so the same initial weights) trained
    with plain `model.fit` on the pooled training splits of all the clients (the very
    examples they trained on, without their validation parts) for R x local-epochs epochs
    at the same batch size, then `model.evaluate` on the same test set.
(c) For scale: the test MSE and MAE of always predicting the pooled training mean.
"""

from __future__ import annotations

import fl_app  # noqa: F401  (quiet TensorFlow start-up: before tensorflow)

# isort: split

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TypedDict

import keras
import numpy as np
from rich.console import Console
from rich.table import Table

from fl_app.cli import simulate
from fl_app.data.sources import Split, data_source, load_partition
from fl_app.data.types import DataSettings
from fl_app.ml.models import build_model
from fl_app.schema import RunConfig
from scripts.bench.common import timed_run
from scripts.bench.results_page import add_results_option, publish

ROOT = Path(__file__).resolve().parents[2]

MODEL = "examples.keras_models:regression"
WORSE_THAN_CENTRAL = 1.5  # flag a federated MSE above this many times the central one


def run_config_overrides(rounds: int, seed: int) -> str:
    """The `--run-config` string of the federated job (as run_simulation.py takes it)."""
    return f"dataset='diabetes' model='{MODEL}' num-server-rounds={rounds} seed={seed}"


class FederatedResult(TypedDict):
    """What `run_federated` reads from the federated run's history.json."""

    mse: float
    mae: float
    rounds: int
    still_falling: bool
    wall: float


def run_federated(overrides: str, num_clients: int, out_dir: Path) -> FederatedResult:
    """(a): the job through `fl_app.cli.simulate.main`; final centralized MSE/MAE, the number
    of rounds completed and the wall time."""
    history, wall = timed_run(overrides, num_clients, out_dir)
    rounds = history["rounds"]
    final = rounds[-1]
    previous = rounds[-2]["centralized"]["loss"] if len(rounds) > 1 else math.inf
    return {"mse": final["centralized"]["loss"], "mae": final["centralized"]["mae"],
            "rounds": final["round"], "still_falling": final["centralized"]["loss"] < previous,
            "wall": wall}


def client_steps_per_round(cfg: RunConfig, num_clients: int) -> int:
    """Optimizer steps a (median) client takes per round: local epochs x its batches."""
    data = DataSettings.from_config(cfg)
    return int(statistics.median(
        int(cfg["local-epochs"]) * math.ceil(len(load_partition(data, pid, num_clients).train)
                                             / int(cfg["batch-size"]))
        for pid in range(num_clients)))


def pooled_training_data(cfg: RunConfig, num_clients: int) -> Split:
    """The training splits of all `num_clients` clients, concatenated."""
    data = DataSettings.from_config(cfg)
    parts = [load_partition(data, pid, num_clients).train for pid in range(num_clients)]
    return Split(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))


def run_central(cfg: RunConfig, pooled: Split, test: Split, epochs: int) -> dict[str, float]:
    """(b): the same compiled model, `model.fit` on the pooled data for `epochs` epochs at
    the run's batch size; test MSE/MAE and the wall time of build, fit and evaluate."""
    start = time.perf_counter()
    model = build_model(str(cfg["model"]), data_source(DataSettings.from_config(cfg)).spec,
                        int(cfg["seed"]))
    keras.utils.set_random_seed(int(cfg["seed"]))  # the shuffling
    model.fit(pooled.x, pooled.y, epochs=epochs, batch_size=cfg["batch-size"], shuffle=True,
              verbose=0)
    logs = model.evaluate(test.x, test.y, verbose=0, return_dict=True)
    return {"mse": float(logs["loss"]), "mae": float(logs["mae"]), "epochs": epochs,
            "wall": time.perf_counter() - start}


def mean_baseline(pooled: Split, test: Split) -> dict[str, float]:
    """(c): test MSE and MAE of always predicting the mean training target."""
    error = test.y.astype(np.float64) - float(np.mean(pooled.y))
    return {"mse": float(np.mean(error ** 2)), "mae": float(np.mean(np.abs(error)))}


def parse_args(argv: list[str] | None, description: str | None) -> argparse.Namespace:
    """`--rounds`, `--seed` and `--num-supernodes` of a regression benchmark."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="federated rounds (default: 20)")
    parser.add_argument("--seed", type=int, default=42, help="run seed (default: 42)")
    parser.add_argument("--num-supernodes", type=int, default=10,
                        help="number of federated clients (default: 10)")
    add_results_option(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.num_supernodes < 1 or args.seed < 0:
        parser.error("--rounds and --num-supernodes must be at least 1, --seed at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run (a), (b), (c) and print the comparison."""
    args = parse_args(argv, __doc__)
    overrides = run_config_overrides(args.rounds, args.seed)
    cfg = simulate.load_run_config(overrides)  # what the federated run resolves too
    out_dir = Path(tempfile.mkdtemp(prefix="bench-regression-"))
    federated = run_federated(overrides, args.num_supernodes, out_dir)

    pooled = pooled_training_data(cfg, args.num_supernodes)
    test = data_source(DataSettings.from_config(cfg)).test_set()
    epochs = federated["rounds"] * int(cfg["local-epochs"])
    central = run_central(cfg, pooled, test, epochs)
    baseline = mean_baseline(pooled, test)
    federated_steps = federated["rounds"] * client_steps_per_round(cfg, args.num_supernodes)
    central_steps = epochs * math.ceil(len(pooled) / int(cfg["batch-size"]))

    table = Table(title=f"{MODEL} on diabetes: {len(pooled)} training examples "
                        f"({args.num_supernodes} IID clients), {len(test)} test examples, "
                        f"batch size {cfg['batch-size']}, seed {args.seed}")
    for column in ("", "rounds", "epochs", "optimizer steps", "test MSE", "test MAE", "wall s"):
        table.add_column(column, justify="right")
    table.add_row(f"(a) federated ({cfg['strategy']}, {cfg['local-epochs']} local epochs)",
                  str(federated["rounds"]), f"{federated['rounds']} x {cfg['local-epochs']}",
                  f"{federated_steps} per client", f"{federated['mse']:.4g}",
                  f"{federated['mae']:.4g}", f"{federated['wall']:.1f}")
    table.add_row("(b) central, model.fit on the pooled data", "", str(central["epochs"]),
                  str(central_steps), f"{central['mse']:.4g}", f"{central['mae']:.4g}",
                  f"{central['wall']:.1f}")
    table.add_row("(c) predict the training mean", "", "", "", f"{baseline['mse']:.4g}",
                  f"{baseline['mae']:.4g}", "")
    console = Console(width=120)
    publish("regression", table, "scripts.bench.regression", console,
            write=not args.no_results)
    ratio = federated["mse"] / central["mse"]
    console.print(f"federated / central test MSE: {ratio:.2f}x; federated output in {out_dir}")
    if ratio > WORSE_THAN_CENTRAL:
        falling = ("; its test MSE was still falling in the last round"
                   if federated["still_falling"] else "")
        console.print(
            f"[bold]the federated MSE is more than {WORSE_THAN_CENTRAL:g}x the central one.[/bold] "
            f"For the same epochs, each client takes {federated_steps} optimizer steps "
            f"({client_steps_per_round(cfg, args.num_supernodes)} a round on its "
            f"~{len(pooled) // args.num_supernodes} examples), and averaging "
            f"{args.num_supernodes} IID clients' updates moves the global model about as far "
            f"as one client's, while central training takes {central_steps} steps on the "
            "pooled data; Adam's steps are about its learning rate in size whatever the "
            f"gradient, and the targets (mean {float(pooled.y.mean()):.0f}) are far from an "
            f"untrained model's outputs, so the federated model is step-limited{falling}. "
            "Each client call also restarts Adam's moments. Compare with more --rounds.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
