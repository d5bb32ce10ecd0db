"""FedNova vs FedAvg when clients do different amounts of local work, on non-IID digits.

    python -m scripts.bench.fednova                  # 3 seeds x 2 strategies, 30 rounds
    python -m scripts.bench.fednova --rounds 10 --seeds 1

Each of `--clients` clients (digits, Dirichlet alpha non-IID) trains a fixed number of local
epochs drawn from `--epochs-range` (`local-epochs-range`, seeded by its partition id), so
some clients do ten times the steps of others: FedAvg's average is pulled towards the
objectives of the clients that worked most, FedNova (Wang et al. 2020,
`strategies/fednova.py`) averages the updates normalised by each client's local steps.
Printed: the final and mean-of-last-5-rounds centralized accuracy per strategy and seed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench.common import run_accuracies, table_parser, tail_mean
from scripts.bench.results_page import add_results_option, publish

STRATEGIES = ("weighted-fedavg", "fednova")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = table_parser(__doc__, rounds=30)
    parser.add_argument("--epochs-range", default="1-10", help="local epochs per client (1-10)")
    parser.add_argument("--dirichlet-alpha", type=float, default=0.3)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    add_results_option(parser)
    return parser.parse_args(argv)


def run_config(args: argparse.Namespace, strategy: str, seed: int) -> str:
    """The `--run-config` of one run."""
    return (f"strategy='{strategy}' partitioner='dirichlet' "
            f"dirichlet-alpha={args.dirichlet_alpha} local-epochs-range='{args.epochs_range}' "
            f"learning-rate={args.learning_rate} num-server-rounds={args.rounds} "
            f"fraction-evaluate=0.0 seed={seed}")


def print_table(args: argparse.Namespace, results: dict[tuple[str, int], list[float]]) -> None:
    """One row per strategy: final / last-5 accuracy per seed, and their means."""
    from rich.table import Table

    seeds = range(1, args.seeds + 1)
    table = Table(title=f"digits, Dirichlet alpha={args.dirichlet_alpha}, {args.clients} "
                        f"clients, local epochs {args.epochs_range} per client, "
                        f"{args.rounds} rounds: accuracy (final / mean of last 5 rounds)")
    table.add_column("strategy")
    for seed in seeds:
        table.add_column(f"seed {seed}", justify="right")
    table.add_column("mean", justify="right")
    for strategy in STRATEGIES:
        curves = [results[strategy, s] for s in seeds]
        cells = [f"{c[-1]:.3f} / {tail_mean(c, 5):.3f}" for c in curves]
        final = sum(c[-1] for c in curves) / len(curves)
        last5 = sum(tail_mean(c, 5) for c in curves) / len(curves)
        table.add_row(strategy, *cells, f"{final:.3f} / {last5:.3f}")
    publish("fednova", table, "scripts.bench.fednova", write=not args.no_results)


def main(argv: list[str] | None = None) -> int:
    """Run both strategies for every seed; print the table."""
    args = parse_args(argv)
    start = time.monotonic()
    results: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="fednova-") as scratch:
        for seed in range(1, args.seeds + 1):
            for strategy in STRATEGIES:
                out = Path(scratch) / f"{strategy}-{seed}"
                curve = run_accuracies(args.clients, run_config(args, strategy, seed), out)
                results[strategy, seed] = curve
                print(f"{strategy:>16} | seed {seed} | accuracy {curve[-1]:.4f} | curve "
                      f"{' '.join(f'{a:.3f}' for a in curve)}", flush=True)
    print_table(args, results)
    print(f"{len(results)} runs in {(time.monotonic() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
