"""Benchmark: the server's aggregation of one round at a real model size (issue 20).

    python -m scripts.bench.aggregation_scale [--repeats 5] [--workloads 50x670k 20xcnn-10m]
                                      [--tables aggregation memory clients costs startup]

Each workload is N client replies (real Flower `FitRes`, float32 arrays serialized by
`ndarrays_to_parameters`) in the layer shapes of a VGG-style CIFAR CNN: `670k` (widths 32,
64, 128 and 186 dense units: 669,992 weights, the size of the issue's first table),
`cnn-1m` (1,077,674) and `cnn-10m` (9,556,554), as `fl_app.ml.models` builds them on
32x32x3 images with 10 classes. Every update is the global model plus small noise, with
examples counts 50..150 (none capped). Side by side in one run, the median of `--repeats`
(the paths interleaved in each repeat, so machine noise hits them alike):
  * validated: the registry's default `strategy=weighted-fedavg`, i.e.
    `ValidatedStrategy(WeightedFedAvg)` with the default checks, as every run builds it;
  * WeightedFedAvg alone (`aggregate_fit` without the validation);
  * Flower's `FedAvg.aggregate_fit`;
  * the single-pass floor: the N updates already as one flat float32 array each, summed
    in place (`np.add(total, flat, out=total)`): one read of every byte, no decoding, no
    checks, no weights.
Then each path's time over the floor's and over Flower's. It also checks that the
validated path's model equals Flower's `aggregate()` (the largest absolute difference).

`--tables` picks issue 20's tables (default: aggregation only; `--tables all` for every one).
The others run their own script, each in a fresh process with its defaults (see each
script for its options and what it measures):
  * memory: `scripts/bench/scale_memory.py`, peak server RSS over one round at 10, 50 and 100
    clients x cnn-10m, whole round vs streamed, and its plot (a few minutes);
  * clients: `scripts/bench/scale_clients.py many` (10,000 Synthetic clients, 100 per round, 30
    rounds: seconds per round and RSS at rounds 1, 10, 30; about 15 minutes here), then
    `many --clients 1000 --model cnn-1m --dataset synthetic-images`, then `costs` (the
    per-client costs behind the 100,000-client estimate);
  * costs: `scripts/bench/scale_costs.py`, SecAgg+, HE, compression and DP at 4.8k and 1 M
    weights (about an hour here);
  * startup: `scripts/bench/scale_startup.py`, where `run_simulation.py`'s start-up goes.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.common import NDArrays, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy import FedAvg
from flwr.server.strategy.aggregate import aggregate

from fl_app.app.config import resolve
from scripts.bench.results_page import add_results_option, write_markdown
from strategies.compose import compose
from strategies.context import StrategyContext
from strategies.weighted_fedavg import WeightedFedAvg
from tests.flower_objects import results  # real FitRes, no client behind them

ROOT = Path(__file__).resolve().parents[2]

# table -> the commands (script and arguments, from the repository root) that print it
TABLES = {
    "memory": [["scripts.bench.scale_memory"]],
    "clients": [["scripts.bench.scale_clients", "many"],
                ["scripts.bench.scale_clients", "many", "--clients", "1000", "--model", "cnn-1m",
                 "--dataset", "synthetic-images"],
                ["scripts.bench.scale_clients", "costs"]],
    "costs": [["scripts.bench.scale_costs"]],
    "startup": [["scripts.bench.scale_startup"]],
}

# name -> (conv widths, dense units) of `fl_app.ml.models.vgg_cnn`
MODELS = {"670k": ((32, 64, 128), 186), "cnn-1m": ((32, 64, 128), 384),
          "cnn-10m": ((64, 128, 256), 2048)}


def vgg_shapes(widths: tuple[int, ...], dense: int, image: tuple[int, int, int] = (32, 32, 3),
               classes: int = 10) -> list[tuple[int, ...]]:
    """The weight shapes of `fl_app.ml.models.vgg_cnn` (two 3x3 convolutions and a 2x2
    pooling per width, a dense layer, the head), without building it."""
    shapes: list[tuple[int, ...]] = []
    channels, side = image[2], image[0]
    for width in widths:
        for _ in range(2):
            shapes += [(3, 3, channels, width), (width,)]
            channels = width
        side //= 2
    return [*shapes, (side * side * channels, dense), (dense,), (dense, classes), (classes,)]


def workload(spec: str, rng: np.random.Generator) -> tuple[NDArrays, list[tuple[NDArrays, int]]]:
    """`NxMODEL`: the global model and N (update, num_examples) pairs in its shapes."""
    count, _, model = spec.partition("x")
    global_model = [rng.normal(0.0, 0.05, shape).astype(np.float32)
                    for shape in vgg_shapes(*MODELS[model])]
    updates = [([g + rng.standard_normal(g.shape, dtype=np.float32) * np.float32(0.01)
                 for g in global_model], int(rng.integers(50, 151))) for _ in range(int(count))]
    return global_model, updates


def median_ms(paths: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """The median milliseconds of each path over `repeats`, the paths interleaved."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, path in paths.items():
            start = time.perf_counter()
            path()
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def measure(spec: str, repeats: int, seed: int) -> str:
    """Print one workload's table; return it (Markdown, under its caption)."""
    global_model, updates = workload(spec, np.random.default_rng(seed))
    fit_results = results(updates)
    validated = compose(StrategyContext(resolve({}), ndarrays_to_parameters(global_model)),
                        meter=False)
    validated.initialize_parameters(SimpleClientManager())
    flats = [np.concatenate([a.reshape(-1) for a in arrays]) for arrays, _ in updates]

    def floor() -> np.ndarray:
        total = np.zeros_like(flats[0])
        for flat in flats:
            np.add(total, flat, out=total)
        return total

    paths = {"validated (ValidatedStrategy(WeightedFedAvg), registry default)":
             lambda: validated.aggregate_fit(1, fit_results, []),
             "WeightedFedAvg alone": lambda: WeightedFedAvg().aggregate_fit(1, fit_results, []),
             "Flower FedAvg.aggregate_fit": lambda: FedAvg().aggregate_fit(1, fit_results, []),
             "single-pass floor (in-place sum of the flat arrays)": floor}
    ms = median_ms(paths, repeats)
    aggregated, _ = validated.aggregate_fit(1, fit_results, [])
    if aggregated is None:
        raise RuntimeError("the validated strategy aggregated no model")
    ours = parameters_to_ndarrays(aggregated)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ours, aggregate(updates)))
    size = sum(a.size for a in global_model)
    flower = ms["Flower FedAvg.aggregate_fit"]
    floor_ms = ms["single-pass floor (in-place sum of the flat arrays)"]
    lines = [f"{len(updates)} updates x {size:,} float32 parameters ({spec}), median of "
             f"{repeats} ms; validated vs Flower's aggregate(): max |diff| {diff:.2g}",
             "| path | ms | x floor | x Flower |", "|---|---|---|---|"]
    lines += [f"| {name} | {value:.1f} | {value / floor_ms:.2f} | {value / flower:.2f} |"
              for name, value in ms.items()]
    print("\n" + "\n".join(lines))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", nargs="+", default=["50x670k", "20xcnn-10m"],
                        metavar="NxMODEL", help=f"N updates of MODEL, one of {list(MODELS)} "
                        "(default: 50x670k 20xcnn-10m)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (median)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated updates")
    parser.add_argument("--tables", nargs="+", default=["aggregation"],
                        choices=["all", "aggregation", *TABLES],
                        help="which tables (default: aggregation; all: every one)")
    add_results_option(parser)
    args = parser.parse_args(argv)
    if "all" in args.tables:
        args.tables = ["aggregation", *TABLES]
    for spec in args.workloads:
        count, sep, model = spec.partition("x")
        if not (sep and count.isdigit() and int(count) > 0 and model in MODELS):
            parser.error(f"workload {spec!r} is not NxMODEL with MODEL in {list(MODELS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    """Print the tables asked for (and write them into docs/results.md): the aggregation
    table of every workload here, the others by their own scripts (`TABLES`), each in a
    fresh process."""
    args = parse_args(argv)
    if "aggregation" in args.tables:
        tables = [measure(spec, args.repeats, args.seed) for spec in args.workloads]
        if not args.no_results:
            write_markdown("aggregation-scale", "\n\n".join(tables),
                           "scripts.bench.aggregation_scale")
    no_results = ["--no-results"] if args.no_results else []
    for table, commands in TABLES.items():
        if table in args.tables:
            for command in commands:
                print(f"\n## {table}: python -m {' '.join(command)}", flush=True)
                subprocess.run([sys.executable, "-m", *command, *no_results], cwd=ROOT,
                               check=True)


if __name__ == "__main__":
    main()
