"""q-FFL's fairness on Synthetic(1,1) with 100 devices: q=0 vs q=1, several seeds.

    python -m scripts.bench.qffl                      # 3 seeds x q in (0, 1), 100 rounds
    python -m scripts.bench.qffl --rounds 20 --seeds 1

Li et al., "Fair Resource Allocation in Federated Learning" (ICLR 2020), as its official
code (litian96/fair_flearn) runs Synthetic: 100 devices of Synthetic(1,1) (sizes
lognormal(4, 2) + 50, uncapped), multinomial logistic regression, devices sampled with
probability proportional to their data size (`client-sampling='size'`), 10 a round, one
local epoch, batch 64 (its run.sh), q-FedAvg's step with L = 1/learning rate
(`strategy='qfedavg'`, `strategies/qffl.py`); accuracy is each device's own, on its
held-out share (here its validation split, `validation-fraction`), every device evaluated
every round. The paper
runs 20,000 rounds and averages 5 data partitions; this runs `--rounds` rounds per seed on
2 cores, so the accuracies are far from converged: the comparison is q=0 vs q=1 at the
same budget. Printed: per q and seed the final round's spread of the devices' accuracy
(`fairness` in history.json: mean, worst and best 10%, variance across devices), then
the mean over seeds, as a markdown table for the docs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench.common import run_history, synthetic_devices
from scripts.bench.results_page import add_results_option, write_markdown

DEVICES, PER_ROUND = 100, 10
COLUMNS = ("mean", "worst_10", "best_10", "variance")
PAPER = ("Paper (Table 1, Synthetic, q=0 vs q=1; 20,000 rounds, 5 partitions): q=1 raises "
         "the worst 10% of devices' accuracy and lowers the variance across devices at a "
         "similar average accuracy.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=100, help="rounds per run (100)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 1..N (3)")
    parser.add_argument("--qs", type=float, nargs="+", default=[0.0, 1.0], help="q (0 1)")
    parser.add_argument("--learning-rate", type=float, default=0.1,
                        help="the devices' SGD learning rate; L = 1/it (0.1)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="local batch size (64, the official code's run.sh)")
    add_results_option(parser)
    return parser.parse_args(argv)


def run_config(args: argparse.Namespace, q: float, seed: int) -> str:
    """The `--run-config` of one run: the paper's devices, then q-FFL's and this run's keys."""
    keys = {"learning-rate": args.learning_rate, "batch-size": args.batch_size,
            "local-epochs": 1, "num-server-rounds": args.rounds, "strategy": "qfedavg",
            "qffl-q": q, "qffl-lipschitz": 1 / args.learning_rate, "client-sampling": "size",
            "min-fit-clients": PER_ROUND, "fraction-evaluate": 1.0,
            "min-evaluate-clients": DEVICES, "examples-cap-factor": 0.0, "seed": seed}
    return " ".join([synthetic_devices(DEVICES, PER_ROUND),
                     *(f"{key}={value!r}" for key, value in keys.items())])


def row(label: str, spread: dict[str, float]) -> str:
    """A markdown row: accuracies in %, the variance in %^2 (as the paper gives them)."""
    return (f"| {label} | {100 * spread['mean']:.1f} | {100 * spread['worst_10']:.1f} | "
            f"{100 * spread['best_10']:.1f} | {1e4 * spread['variance']:.0f} |")


def markdown(args: argparse.Namespace, results: dict[tuple[float, int], dict[str, float]],
             minutes: float) -> str:
    """The table: each q's mean over seeds, then every seed's run."""
    seeds = sorted({seed for _, seed in results})
    lines = [f"Synthetic(1,1), {DEVICES} devices, {PER_ROUND} a round sampled by size, "
             f"logreg, lr {args.learning_rate:g} (L = {1 / args.learning_rate:g}), batch "
             f"{args.batch_size}, 1 local epoch, {args.rounds} rounds, seeds "
             f"{', '.join(map(str, seeds))}; the devices' accuracy on their own validation "
             f"split after the last round (`python -m scripts.bench.qffl --rounds "
             f"{args.rounds} --seeds {len(seeds)} --learning-rate {args.learning_rate:g} "
             f"--batch-size {args.batch_size}`, {minutes:.0f} min on 2 shared cores).",
             "",
             "| q | mean accuracy % | worst 10% | best 10% | variance (%²) |",
             "|---|---:|---:|---:|---:|"]
    for q in args.qs:
        runs = [results[q, seed] for seed in seeds]
        lines.append(row(f"**{q:g}** (mean of {len(runs)} seeds)",
                         {c: statistics.fmean(r[c] for r in runs) for c in COLUMNS}))
    for q in args.qs:
        lines += [row(f"{q:g}, seed {seed}", results[q, seed]) for seed in seeds]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run q-FFL for every q and seed; print each run's figures and the table."""
    args = parse_args(argv)
    start = time.monotonic()
    results: dict[tuple[float, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="qffl-") as scratch:
        for seed in range(1, args.seeds + 1):
            for q in args.qs:
                history = run_history(DEVICES, run_config(args, q, seed),
                                      Path(scratch) / f"q{q:g}-seed{seed}")
                results[q, seed] = history["rounds"][-1]["fairness"]["accuracy"]
                print(f"q={q:g} seed {seed}: " + ", ".join(
                    f"{c} {results[q, seed][c]:.4f}" for c in COLUMNS), flush=True)
    table = markdown(args, results, (time.monotonic() - start) / 60)
    print(table)
    if not args.no_results:
        write_markdown("qffl", table, "scripts.bench.qffl")
    print(PAPER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
