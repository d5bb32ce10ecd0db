"""Benchmark: this app vs. the Flower quickstart-tensorflow pattern vs. the compute floor,
for a classifier and a regressor.

    python -m scripts.bench.overhead [--rounds 10] [--num-supernodes 10]
                                         [--workloads classifier,regressor]

Runs each workload (10 IID clients, 5 local epochs) three ways in one process and prints
start-up and per-round times separately:
  * classifier: the default config (digits, the `mlp` builder compiled with SGD(0.1),
    sparse categorical cross-entropy, accuracy);
  * regressor: `dataset='diabetes' model='examples.keras_models:regression'` (the user's
    function: Dense(10, relu), Dense(1), compiled with Adam(0.01), mse, mae).
The three ways:
  (a) this app through run_simulation (compiled Keras loops, model built once per process);
  (b) the quickstart-tensorflow pattern on the same simulation engine: each client call
      rebuilds the model after `keras.backend.clear_session()` and compiles it the way the
      workload's model is compiled (the builder or the user's function, which return it
      compiled), trains with `model.fit`, evaluates with `model.evaluate`; Flower's FedAvg;
  (c) the compute floor: the same local training, one client after another, in this
      process with no FL at all, the faster of (c1) the TensorFlow guide's custom loop (a
      `tf.function` step per batch over a cached `tf.data` pipeline, with the model's
      compiled loss and a copy of its compiled optimizer) and (c2) the app's compiled
      epoch loop alone (no weight transfer, no client, no Flower).
Per-round time is the median of rounds 2..N; "fixed cost" is the rest of the wall time
(start-up of the engine and its workers, round 1, shut-down). A client call is timed
directly on `KerasClient.fit` against the floor for the same client (per client, the
best of three calls of each, interleaved, as the machine may be shared). The targets: a
client call at most 2x the floor, rounds at least 10x faster than the quickstart pattern.
"""

from __future__ import annotations

import fl_app  # noqa: F401  (quiet TensorFlow start-up: before tensorflow)

# isort: split

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import ConfigRecordValues, Context, NDArrays, Scalar, ndarrays_to_parameters
from flwr.server import ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation
from rich.console import Console
from rich.table import Table

from fl_app.app.config import resolve
from fl_app.app.local_client import client_for
from fl_app.data.sources import Split, data_source, load_partition
from fl_app.data.types import DataSettings
from fl_app.ml.models import build_model
from fl_app.ml.trainer import TrainSettings, fresh_optimizer, trainer_for
from fl_app.schema import RunConfig
from fl_app.server.outputs import read_history
from fl_app.wire import round_config
from scripts.bench.results_page import add_results_option, publish

ROOT = Path(__file__).resolve().parents[2]

BACKEND: dict[str, dict[str, ConfigRecordValues]] = {
    "client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {}}
CALL_TARGET = 2.0  # a client call at most this many times the compute floor
ROUND_TARGET = 10.0  # rounds at least this many times faster than the quickstart pattern
REPEATS = 3  # per-client timings are the best of this many calls (the machine may be shared)


@dataclass(frozen=True)
class Workload:
    """A benchmarked job: run-config overrides on top of the defaults, and the compiled
    metric (by Keras name) reported next to the loss."""

    name: str
    overrides: Mapping[str, object] = field(default_factory=dict)
    metric: str = "accuracy"


WORKLOADS: dict[str, Workload] = {
    "classifier": Workload("classifier"),
    "regressor": Workload("regressor", {"dataset": "diabetes",
                                        "model": "examples.keras_models:regression"}, "mae"),
}


def _quickstart_model(cfg: RunConfig) -> keras.Model:
    """Build the model from scratch as the quickstart does: after `clear_session()`, the
    workload's builder (or the user's function), which returns it compiled."""
    keras.backend.clear_session()
    return build_model(str(cfg["model"]), data_source(DataSettings.from_config(cfg)).spec,
                       int(cfg["seed"]))


class QuickstartClient(NumPyClient):
    """The quickstart-tensorflow client: a fresh model per call, `fit`/`evaluate`."""

    def __init__(self, cfg: RunConfig, partition_id: int, num_partitions: int) -> None:
        self.cfg = cfg
        self.data = load_partition(DataSettings.from_config(cfg), partition_id, num_partitions)
        self.model = _quickstart_model(cfg)

    def fit(self, parameters: NDArrays,
            config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Load the weights, `model.fit` for the local epochs, return the new weights."""
        self.model.set_weights(parameters)
        self.model.fit(self.data.train.x, self.data.train.y, epochs=self.cfg["local-epochs"],
                       batch_size=self.cfg["batch-size"], verbose=0)
        return self.model.get_weights(), len(self.data.train), {}

    def evaluate(self, parameters: NDArrays,
                 config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        """`model.evaluate` on the local validation split: loss and compiled metrics."""
        self.model.set_weights(parameters)
        logs = self.model.evaluate(self.data.val.x, self.data.val.y, verbose=0,
                                   return_dict=True)
        return float(logs.pop("loss")), len(self.data.val), {k: float(v) for k, v in logs.items()}


def quickstart_apps(cfg: RunConfig, rounds: int,
                    marks: list[tuple[float, dict[str, float]]]) -> tuple[ServerApp, ClientApp]:
    """ServerApp + ClientApp of pattern (b); `marks` collects (time, centralized evaluation
    logs: loss and compiled metrics) per round."""

    def client_fn(context: Context):
        return QuickstartClient(cfg, int(context.node_config["partition-id"]),
                                int(context.node_config["num-partitions"])).to_client()

    def server_fn(context: Context) -> ServerAppComponents:
        test = data_source(DataSettings.from_config(cfg)).test_set()

        def evaluate_fn(server_round, arrays, config):
            model = _quickstart_model(cfg)
            model.set_weights(arrays)
            logs = {k: float(v) for k, v in
                    model.evaluate(test.x, test.y, verbose=0, return_dict=True).items()}
            marks.append((time.perf_counter(), logs))
            return logs["loss"], {k: v for k, v in logs.items() if k != "loss"}

        initial = ndarrays_to_parameters(_quickstart_model(cfg).get_weights())
        strategy = FedAvg(initial_parameters=initial, evaluate_fn=evaluate_fn,
                          min_fit_clients=2, min_available_clients=2)
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    return ServerApp(server_fn=server_fn), ClientApp(client_fn=client_fn)


def run_this_app(cfg: RunConfig, n: int, metric: str) -> dict[str, float]:
    """(a): the app through Flower's simulation engine; times from history.json."""
    from fl_app.app.client_app import make_client_app
    from fl_app.app.server_app import make_server_app

    start = time.perf_counter()
    run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg),
                   num_supernodes=n, backend_config=BACKEND)
    wall = time.perf_counter() - start
    rounds = read_history(Path(str(cfg["out-dir"])))["rounds"][1:]
    later = [r["seconds"] for r in rounds[1:]]
    final = rounds[-1]["centralized"]
    return {"wall": wall, "round": statistics.median(later), "fixed": wall - sum(later),
            "loss": final["loss"], "metric": final[metric]}


def run_quickstart(cfg: RunConfig, n: int, rounds: int, metric: str) -> dict[str, float]:
    """(b): the quickstart pattern; round boundaries from the centralized evaluations."""
    marks: list[tuple[float, dict[str, float]]] = []
    server_app, client_app = quickstart_apps(cfg, rounds, marks)
    start = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n,
                   backend_config=BACKEND)
    wall = time.perf_counter() - start
    later = list(np.diff([t for t, _ in marks])[1:])  # rounds 2..N
    final = marks[-1][1]
    return {"wall": wall, "round": statistics.median(later), "fixed": wall - sum(later),
            "loss": final["loss"], "metric": final[metric]}


def guide_loop(cfg: RunConfig) -> Callable[[Split], Callable[[], None]]:
    """(c1): the TensorFlow guide's custom loop, a plain per-batch tf.function step with the
    model's compiled loss and a fresh copy of its compiled optimizer; returns, for a
    client's training split, a callable that runs its local epochs."""
    spec = data_source(DataSettings.from_config(cfg)).spec
    settings = TrainSettings.from_config(cfg)
    encode = trainer_for(settings, spec).targets  # targets as the compiled loss takes them
    model = build_model(settings.model, spec, settings.seed)
    optimizer = fresh_optimizer(model, settings.optimizer, settings.learning_rate)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=x, y=y, y_pred=model(x, training=True), training=True)
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                      model.trainable_variables))

    def for_client(train: Split) -> Callable[[], None]:
        batches = tf.data.Dataset.from_tensor_slices((train.x, encode(train.y))).batch(
            cfg["batch-size"]).cache()

        def run() -> None:
            for _ in range(int(cfg["local-epochs"])):
                for x, y in batches:
                    step(x, y)

        return run

    return for_client


def per_client_seconds(cfg: RunConfig, n: int) -> dict[str, list[float]]:
    """Per client, the best of `REPEATS` timings of (c1) the guide's loop, (c2) the compiled
    epoch loop alone (`KerasTrainer.fit`) and `call`, a whole `KerasClient.fit` (weights
    in, train, weights out). The three are interleaved, so that a load change on a shared
    machine hits them alike; a first untimed run of each traces and warms it."""
    guide = guide_loop(cfg)
    settings = TrainSettings.from_config(cfg)
    trainer = trainer_for(settings, data_source(DataSettings.from_config(cfg)).spec)
    weights = trainer.get_weights()
    epochs, batch_size = int(cfg["local-epochs"]), int(cfg["batch-size"])
    learning_rate = settings.learning_rate or None
    config: dict[str, Scalar] = {**round_config(cfg, 1)}  # as Flower's Scalar
    times: dict[str, list[float]] = {"guide": [], "epoch_loop": [], "call": []}
    for pid in range(n):
        train = load_partition(DataSettings.from_config(cfg), pid, n).train
        client = client_for(cfg, {"partition-id": pid, "num-partitions": n})

        def epoch_loop(train: Split = train) -> object:
            return trainer.fit(train, epochs=epochs, batch_size=batch_size,
                               learning_rate=learning_rate)

        def call(client: NumPyClient = client) -> object:
            return client.fit(weights, config)

        runs: dict[str, Callable[[], object]] = {
            "guide": guide(train),
            "epoch_loop": epoch_loop,
            "call": call,
        }
        for run in runs.values():
            run()
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(REPEATS):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
        for name, seconds in best.items():
            times[name].append(seconds)
    return times


def benchmark(workload: Workload, rounds: int, n: int, console: Console,
              write: bool = True) -> dict[str, float]:
    """Run (a), (b), (c) for one workload, print its table and ratios; return the ratios
    (`call_vs_floor`, `rounds_speedup`)."""
    out = tempfile.mkdtemp(prefix=f"bench-{workload.name}-")
    cfg = resolve({**workload.overrides, "num-server-rounds": rounds, "out-dir": out})

    per_client = per_client_seconds(cfg, n)
    guide, epoch_loop, calls = (per_client[k] for k in ("guide", "epoch_loop", "call"))
    floor = [min(a, b) for a, b in zip(guide, epoch_loop)]
    app = run_this_app(cfg, n, workload.metric)
    quick = run_quickstart(cfg, n, rounds, workload.metric)

    table = Table(title=f"{workload.name}: {cfg['model']} on {cfg['dataset']} "
                        f"{str(cfg['partitioner']).upper()}, {n} clients, {rounds} rounds, "
                        f"{cfg['local-epochs']} local epochs")
    for column in ("", "fixed cost s", "median round s", "final loss",
                   f"final {workload.metric}"):
        table.add_column(column, justify="right")
    for label, result in (("(a) this app", app), ("(b) quickstart pattern", quick)):
        table.add_row(label, f"{result['fixed']:.1f}", f"{result['round']:.3f}",
                      f"{result['loss']:.4f}", f"{result['metric']:.4f}")
    floor_round = sum(floor)
    table.add_row("(c1) floor: guide's per-batch loop", "", f"{sum(guide):.3f}", "", "")
    table.add_row("(c2) floor: compiled epoch loop", "", f"{sum(epoch_loop):.3f}", "", "")
    table.add_row("(c) compute floor (faster per client)", "", f"{floor_round:.3f}", "", "")
    publish(f"overhead-{workload.name}", table, "scripts.bench.overhead", console, write)

    call_ratio = statistics.median(calls) / statistics.median(floor)
    speedup = quick["round"] / app["round"]
    console.print(f"{workload.name} rounds: (a) is {speedup:.1f}x faster than (b) "
                  f"(target >= {ROUND_TARGET:g}x: {'met' if speedup >= ROUND_TARGET else 'MISSED'})"
                  f"; (a) round vs floor round: {app['round'] / floor_round:.1f}x")
    console.print(f"{workload.name} client call: median {statistics.median(calls) * 1e3:.1f} ms "
                  f"vs floor {statistics.median(floor) * 1e3:.1f} ms per client = "
                  f"{call_ratio:.2f}x the floor (target <= {CALL_TARGET:g}x: "
                  f"{'met' if call_ratio <= CALL_TARGET else 'MISSED'})")
    return {"call_vs_floor": call_ratio, "rounds_speedup": speedup}


def parse_workloads(value: str) -> list[Workload]:
    """`classifier,regressor` -> the workloads, in that order; argparse error if unknown."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown workload(s) {', '.join(unknown) or '(none)'}; choose from "
            f"{', '.join(WORKLOADS)}")
    return [WORKLOADS[name] for name in names]


def main(argv: list[str] | None = None) -> int:
    """Run (a), (b), (c) for each workload and print the comparisons."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--workloads", type=parse_workloads, default=list(WORKLOADS.values()),
                        help=f"comma-separated, from {', '.join(WORKLOADS)} (default: all)")
    add_results_option(parser)
    args = parser.parse_args(argv)
    if args.rounds < 3:
        parser.error("--rounds must be at least 3 (the median round leaves out round 1)")
    console = Console(width=120)
    ratios = {w.name: benchmark(w, args.rounds, args.num_supernodes, console, not args.no_results)
              for w in args.workloads}
    summary = Table(title="summary")
    for column in ("workload", f"client call / floor (target <= {CALL_TARGET:g}x)",
                   f"rounds speed-up vs (b) (target >= {ROUND_TARGET:g}x)"):
        summary.add_column(column, justify="right")
    for name, ratio in ratios.items():
        summary.add_row(name, f"{ratio['call_vs_floor']:.2f}x",
                        f"{ratio['rounds_speedup']:.1f}x")
    publish("overhead-summary", summary, "scripts.bench.overhead", console,
            write=not args.no_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
