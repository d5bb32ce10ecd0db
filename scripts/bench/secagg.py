"""Benchmark: what SecAgg+ costs against plaintext weighted-fedavg, per round and per client.

    python -m scripts.bench.secagg [--rounds 20] [--num-supernodes 10]
                                      [--models mlp,examples.keras_models:wide_mlp]

Runs the app on Flower's simulation engine, once in plaintext and once with
`secure-aggregation=secagg+`, for the default model (`mlp`, 4.8k parameters on digits) and a
model 10x larger (`examples.keras_models:wide_mlp`, 48k), on the default workload (digits,
10 IID clients, the default rounds and epochs). Prints for each: the final centralized
accuracy, the median seconds of a round (rounds 2..N: round 1 carries the workers' start-up),
and the fit traffic per client per round, down (server to client) and up, counted as the
bytes of the messages' records (arrays, configs, metrics) the server sends and receives
through the Grid: the global model and the reply for plaintext; SecAgg+'s four stages (keys,
encrypted shares, the masked vector, the unmasking shares) for secure rounds. Evaluation
traffic is the same in both and not counted. The quantization bound of the aggregate is
printed next to the SecAgg+ rows (`tests/test_secagg.py` checks it): per coordinate,
k(2r + 2max|u|)/(Q·Σ n_i/W) for k clients with n_i examples, clipping range r, quantization
range Q, max weight W and updates u.
"""

from __future__ import annotations

import fl_app  # noqa: F401  (quiet TensorFlow start-up: before tensorflow)

# isort: split

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from rich.table import Table

from fl_app.app.client_app import make_client_app
from fl_app.app.config import resolve
from fl_app.app.server_app import serve
from fl_app.data.node_data import load_client
from fl_app.data.types import DataSettings
from fl_app.schema import RunConfig
from fl_app.server.wire_bytes import MeteredGrid
from scripts.bench.results_page import add_results_option, publish

ROOT = Path(__file__).resolve().parents[2]

MODELS = ("mlp", "examples.keras_models:wide_mlp")
STARTUP_ATTEMPTS = 3


def run(cfg: RunConfig, num_supernodes: int) -> dict[str, Any]:
    """One simulation; its history and the fit traffic."""
    metered: list[MeteredGrid] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        metered.append(MeteredGrid(grid))
        serve(metered[0], context, cfg)

    for attempt in range(1, STARTUP_ATTEMPTS + 1):
        try:
            run_simulation(server_app=server_app, client_app=make_client_app(cfg),
                           num_supernodes=num_supernodes,
                           backend_config={"client_resources": {"num_cpus": 1,
                                                                "num_gpus": 0.0}})
            break
        except RuntimeError as err:  # Ray gives its node 30 s to start: too few when loaded
            if attempt == STARTUP_ATTEMPTS:
                raise
            print(f"the simulation engine did not start ({err}); retrying", flush=True)
            metered.clear()  # a new run from scratch: count only its traffic
    history = json.loads((Path(str(cfg["out-dir"])) / "history.json").read_text())
    return {"history": history, "down": metered[0].counts.down, "up": metered[0].counts.up}


def bound(cfg: RunConfig, num_examples: list[int], max_update: float) -> float:
    """The per-coordinate quantization bound of a SecAgg+ aggregate (module doc)."""
    weight = sum(num_examples) / float(cfg["secagg-max-weight"])
    return len(num_examples) * (2 * float(cfg["secagg-clipping-range"]) + 2 * max_update) / (
        int(cfg["secagg-quantization-range"]) * weight)


def main(argv: list[str] | None = None) -> int:
    """Run every model plaintext and secure; print the table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--models", default=",".join(MODELS))
    add_results_option(parser)
    args = parser.parse_args(argv)
    table = Table(title=f"SecAgg+ vs plaintext weighted-fedavg ({args.num_supernodes} clients, "
                        f"{args.rounds} rounds)")
    for column in ("model", "aggregation", "accuracy", "s/round", "KiB down/client/round",
                   "KiB up/client/round", "bound"):
        table.add_column(column, justify="left" if column in ("model", "aggregation")
                         else "right")
    for model in args.models.split(","):
        for secure in ("none", "secagg+"):
            with tempfile.TemporaryDirectory() as out:
                cfg = resolve({"model": model, "num-server-rounds": args.rounds,
                               "secure-aggregation": secure, "examples-cap-factor": 0.0,
                               "out-dir": out})
                result = run(cfg, args.num_supernodes)
            rounds = result["history"]["rounds"]
            seconds = statistics.median(r["seconds"] for r in rounds[2:]) if len(rounds) > 2 \
                else rounds[-1]["seconds"]
            per = 1024 * args.num_supernodes * (len(rounds) - 1)
            data = DataSettings.from_config(cfg)
            counts = [len(load_client(data, {"partition-id": i,
                                             "num-partitions": args.num_supernodes}).train)
                      for i in range(args.num_supernodes)]
            table.add_row(model, secure, f"{rounds[-1]['centralized']['accuracy']:.4f}",
                          f"{seconds:.2f}", f"{result['down'] / per:.1f}",
                          f"{result['up'] / per:.1f}",
                          f"{bound(cfg, counts, 1.0):.1e}" if secure != "none" else "")
            print(json.dumps({"model": model, "secure": secure, "accuracy":
                              rounds[-1]["centralized"]["accuracy"], "seconds": seconds,
                              "down_per_client_round": result["down"] / per * 1024,
                              "up_per_client_round": result["up"] / per * 1024}), flush=True)
    publish("secagg", table, "scripts.bench.secagg", write=not args.no_results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
