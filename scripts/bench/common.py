"""What the benches share: one simulation run (`timed_run`), its history and accuracies,
and the command-line options every table has."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from fl_app.cli import simulate
from fl_app.server.outputs import read_history


def timed_run(overrides: str, num_clients: int, out_dir: Path,
              cpus_per_client: float | None = None) -> tuple[dict[str, Any], float]:
    """Run `run_simulation.py --num-supernodes N --run-config OVERRIDES --out DIR` in this
    process (`fl_app.cli.simulate.main`; with `cpus_per_client`, also
    `--num-cpus-per-client`); return its history.json and wall seconds.
    Raises RuntimeError when the run fails."""
    start = time.perf_counter()
    cpus = ["--num-cpus-per-client", f"{cpus_per_client:g}"] if cpus_per_client else []
    code = simulate.main(["--num-supernodes", str(num_clients), *cpus, "--run-config",
                          overrides, "--out", str(out_dir)])
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"the run {overrides!r} failed with exit status {code}; see the "
                           "log above")
    return read_history(out_dir), seconds


def table_parser(doc: str | None, rounds: int, clients: int = 10,
                 seeds: int | None = 3) -> argparse.ArgumentParser:
    """A table script's command line (its module `doc` as help) with the options every
    such script has: `--clients`, `--rounds` and (unless `seeds` is None) `--seeds`
    (seeds 1..N), at these defaults."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=clients,
                        help=f"simulated clients ({clients})")
    parser.add_argument("--rounds", type=int, default=rounds, help=f"rounds per run ({rounds})")
    if seeds is not None:
        parser.add_argument("--seeds", type=int, default=seeds, help=f"seeds 1..N ({seeds})")
    return parser


def run_history(clients: int, run_config: str, out: Path, attempts: int = 3,
                cpus_per_client: float | None = None) -> dict[str, Any]:
    """Run `run_simulation.py` with `clients` clients and `run_config`, writing to `out`
    (`scripts.bench.common.timed_run`; `cpus_per_client`: Ray's CPUs per client, e.g.
    CPUs / clients for one actor per client); return its history.json. A run that fails
    (Ray failing to start on a loaded machine) is started again, up to `attempts` times in
    all; exit if it still fails."""
    for attempt in range(1, attempts + 1):
        try:
            return timed_run(run_config, clients, out, cpus_per_client)[0]
        except RuntimeError as err:
            print(f"attempt {attempt}/{attempts}: {err}", flush=True)
    raise SystemExit(f"run with {run_config!r} failed {attempts} times")


def run_accuracies(clients: int, run_config: str, out: Path, attempts: int = 3) -> list[float]:
    """`run_history`'s centralized accuracy after each round (round 0, the initial model,
    first)."""
    history = run_history(clients, run_config, out, attempts)
    return [float(r["centralized"]["accuracy"]) for r in history["rounds"]]


def synthetic_devices(devices: int, per_round: int) -> str:
    """The run-config of the FedProx and q-FFL papers' Synthetic(1,1) runs: `devices` users
    of uncapped size (lognormal(4, 2) + 50), 10% of each held out for the server, multinomial
    logistic regression, `per_round` of them sampled each round."""
    return (f"dataset='synthetic' synthetic-alpha=1.0 synthetic-beta=1.0 "
            f"synthetic-num-users={devices} synthetic-max-samples=0 test-fraction=0.1 "
            f"model='logreg' fraction-fit={per_round / devices + 0.005:.3f} "
            f"min-available-clients={devices}")


def tail_mean(values: list[float], rounds: int) -> float:
    """The mean of the last `rounds` values (smooths the round-to-round noise of a final
    accuracy)."""
    tail = values[-rounds:]
    return sum(tail) / len(tail)


def timeline(history: dict[str, Any]) -> list[tuple[float, float]]:
    """(seconds since round 0, centralized accuracy) after every round / version."""
    elapsed, points = 0.0, []
    for record in history["rounds"]:
        elapsed += float(record["seconds"])
        points.append((elapsed, float(record["centralized"]["accuracy"])))
    return points


def time_to(points: list[tuple[float, float]], accuracy: float) -> float | None:
    """When the accuracy first reached `accuracy` (None: never)."""
    return next((t for t, acc in points if acc >= accuracy), None)
