"""Benchmark: this app vs. the Flower quickstart-tensorflow pattern vs. the compute floor.

    python scripts/benchmark_overhead.py [--rounds 10] [--num-supernodes 10]

Runs the default workload (digits, IID, 10 clients, 5 local epochs) three ways in one
process and prints start-up and per-round times separately:
  (a) this app through run_simulation (compiled Keras loops, model built once per process);
  (b) the quickstart-tensorflow pattern on the same simulation engine: each client call
      rebuilds and compiles the model after `keras.backend.clear_session()`, trains with
      `model.fit`, evaluates with `model.evaluate`; Flower's FedAvg;
  (c) the compute floor: the same local training, one client after another, in this
      process with no FL at all, the faster of (c1) the TensorFlow guide's custom loop (a
      `tf.function` step per batch over a cached `tf.data` pipeline) and (c2) the app's
      compiled epoch loop alone (no weight transfer, no client, no Flower).
Per-round time is the median of rounds 2..N; "fixed cost" is the rest of the wall time
(start-up of the engine and its workers, round 1, shut-down). A client call is timed
directly on `KerasClient.fit` against the floor for the same client.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fl_app  # noqa: E402,F401,I001  (quiet TensorFlow start-up: before tensorflow)
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from flwr.client import NumPyClient  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common import Context, ndarrays_to_parameters  # noqa: E402
from flwr.server import ServerAppComponents, ServerConfig  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from fl_app.app.client_app import client_for  # noqa: E402
from fl_app.app.config import resolve  # noqa: E402
from fl_app.data.sources import data_source, load_partition  # noqa: E402
from fl_app.ml.models import build_model  # noqa: E402
from fl_app.ml.trainer import trainer_for  # noqa: E402
from fl_app.schema import RunConfig  # noqa: E402
from fl_app.server.outputs import read_history  # noqa: E402
from fl_app.wire import round_config  # noqa: E402

BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {}}


def _quickstart_model(cfg: RunConfig) -> keras.Model:
    """Build and compile the model the way the quickstart does, from scratch."""
    keras.backend.clear_session()
    model = build_model(cfg["model"], data_source(cfg).spec, cfg["seed"])
    model.compile(optimizer=keras.optimizers.SGD(cfg["learning-rate"]),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


class QuickstartClient(NumPyClient):
    """The quickstart-tensorflow client: a fresh model per call, `fit`/`evaluate`."""

    def __init__(self, cfg: RunConfig, partition_id: int, num_partitions: int) -> None:
        self.cfg = cfg
        self.data = load_partition(cfg, partition_id, num_partitions)
        self.model = _quickstart_model(cfg)

    def fit(self, parameters, config):
        self.model.set_weights(parameters)
        self.model.fit(self.data.train.x, self.data.train.y, epochs=self.cfg["local-epochs"],
                       batch_size=self.cfg["batch-size"], verbose=0)
        return self.model.get_weights(), len(self.data.train), {}

    def evaluate(self, parameters, config):
        self.model.set_weights(parameters)
        loss, accuracy = self.model.evaluate(self.data.val.x, self.data.val.y, verbose=0)
        return loss, len(self.data.val), {"accuracy": accuracy}


def quickstart_apps(cfg: RunConfig, rounds: int, marks: list[tuple[float, float]]):
    """ServerApp + ClientApp of pattern (b); `marks` collects (time, accuracy) per round."""

    def client_fn(context: Context):
        return QuickstartClient(cfg, int(context.node_config["partition-id"]),
                                int(context.node_config["num-partitions"])).to_client()

    def server_fn(context: Context) -> ServerAppComponents:
        test = data_source(cfg).test_set()

        def evaluate_fn(server_round, arrays, config):
            model = _quickstart_model(cfg)
            model.set_weights(arrays)
            loss, accuracy = model.evaluate(test.x, test.y, verbose=0)
            marks.append((time.perf_counter(), accuracy))
            return loss, {"accuracy": accuracy}

        initial = ndarrays_to_parameters(_quickstart_model(cfg).get_weights())
        strategy = FedAvg(initial_parameters=initial, evaluate_fn=evaluate_fn,
                          min_fit_clients=2, min_available_clients=2)
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=rounds))

    return ServerApp(server_fn=server_fn), ClientApp(client_fn=client_fn)


def run_this_app(cfg: RunConfig, n: int) -> dict:
    """(a): the app through Flower's simulation engine; times from history.json."""
    from fl_app.app.client_app import make_client_app
    from fl_app.app.server_app import make_server_app

    start = time.perf_counter()
    run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg),
                   num_supernodes=n, backend_config=BACKEND)
    wall = time.perf_counter() - start
    rounds = read_history(Path(cfg["out-dir"]))["rounds"][1:]
    later = [r["seconds"] for r in rounds[1:]]
    return {"wall": wall, "round": statistics.median(later), "fixed": wall - sum(later),
            "accuracy": rounds[-1]["centralized"]["accuracy"]}


def run_quickstart(cfg: RunConfig, n: int, rounds: int) -> dict:
    """(b): the quickstart pattern; round boundaries from the centralized evaluations."""
    marks: list[tuple[float, float]] = []
    server_app, client_app = quickstart_apps(cfg, rounds, marks)
    start = time.perf_counter()
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n,
                   backend_config=BACKEND)
    wall = time.perf_counter() - start
    later = list(np.diff([t for t, _ in marks])[1:])  # rounds 2..N
    return {"wall": wall, "round": statistics.median(later), "fixed": wall - sum(later),
            "accuracy": marks[-1][1]}


def guide_loop_seconds(cfg: RunConfig, n: int) -> list[float]:
    """(c1): each client's local training in a plain per-batch tf.function step."""
    model = build_model(cfg["model"], data_source(cfg).spec, cfg["seed"])
    optimizer = keras.optimizers.SGD(cfg["learning-rate"])
    loss_fn = keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                      model.trainable_variables))

    times = []
    for pid in range(n):
        train = load_partition(cfg, pid, n).train
        batches = tf.data.Dataset.from_tensor_slices((train.x, train.y)).batch(
            cfg["batch-size"]).cache()
        for x, y in batches:  # trace and warm the cache outside the timing
            step(x, y)
        start = time.perf_counter()
        for _ in range(cfg["local-epochs"]):
            for x, y in batches:
                step(x, y)
        times.append(time.perf_counter() - start)
    return times


def epoch_loop_seconds(cfg: RunConfig, n: int) -> list[float]:
    """(c2): each client's local training in the compiled epoch loop alone."""
    trainer = trainer_for(cfg, data_source(cfg).spec)
    times = []
    for pid in range(n):
        train = load_partition(cfg, pid, n).train
        fit = dict(epochs=cfg["local-epochs"], batch_size=cfg["batch-size"],
                   learning_rate=cfg["learning-rate"])
        trainer.fit(train, **fit)  # warm
        start = time.perf_counter()
        trainer.fit(train, **fit)
        times.append(time.perf_counter() - start)
    return times


def client_call_seconds(cfg: RunConfig, n: int) -> list[float]:
    """Wall time of `KerasClient.fit` per client (weights in, train, weights out)."""
    weights = trainer_for(cfg, data_source(cfg).spec).get_weights()
    times = []
    for pid in range(n):
        client = client_for(cfg, {"partition-id": pid, "num-partitions": n})
        client.fit(weights, round_config(cfg, 0))  # warm: first call traces the loop
        start = time.perf_counter()
        client.fit(weights, round_config(cfg, 1))
        times.append(time.perf_counter() - start)
    return times


def main() -> int:
    """Run (a), (b), (c) and print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--num-supernodes", type=int, default=10)
    args = parser.parse_args()
    out = tempfile.mkdtemp(prefix="bench-")
    cfg = resolve({"num-server-rounds": args.rounds, "out-dir": out})
    n = args.num_supernodes

    guide, epoch_loop = guide_loop_seconds(cfg, n), epoch_loop_seconds(cfg, n)
    floor = [min(a, b) for a, b in zip(guide, epoch_loop)]
    calls = client_call_seconds(cfg, n)
    app = run_this_app(cfg, n)
    quick = run_quickstart(cfg, n, args.rounds)

    table = Table(title=f"{n} clients, {args.rounds} rounds, digits IID, "
                        f"{cfg['local-epochs']} local epochs")
    for column in ("", "fixed cost s", "median round s", "final accuracy"):
        table.add_column(column, justify="right")
    table.add_row("(a) this app", f"{app['fixed']:.1f}", f"{app['round']:.3f}",
                  f"{app['accuracy']:.4f}")
    table.add_row("(b) quickstart pattern", f"{quick['fixed']:.1f}", f"{quick['round']:.3f}",
                  f"{quick['accuracy']:.4f}")
    floor_round = sum(floor)
    table.add_row("(c1) floor: guide's per-batch loop", "", f"{sum(guide):.3f}", "")
    table.add_row("(c2) floor: compiled epoch loop", "", f"{sum(epoch_loop):.3f}", "")
    table.add_row("(c) compute floor (faster per client)", "", f"{floor_round:.3f}", "")
    console = Console(width=120)
    console.print(table)
    console.print(f"rounds: (a) is {quick['round'] / app['round']:.1f}x faster than (b); "
                  f"(a) round vs floor round: {app['round'] / floor_round:.1f}x")
    console.print(f"client call: median {statistics.median(calls) * 1e3:.1f} ms vs floor "
                  f"{statistics.median(floor) * 1e3:.1f} ms per client "
                  f"= {statistics.median(calls) / statistics.median(floor):.2f}x the floor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
