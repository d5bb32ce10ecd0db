"""Client-side rebalancing (`rebalance`) on label-skewed digits: accuracy and worst-class recall.

    python -m scripts.bench.rebalance                 # 2 partitions x 4 modes x 3 seeds
    python -m scripts.bench.rebalance --seeds 1 --rounds 5

The default digits workload (10 clients, `--rounds` rounds, the mlp, 5 local epochs) on
two label-skewed partitions, `partitioner='pathological'` (2 classes per client) and
`partitioner='dirichlet'` with `dirichlet-alpha=0.1`, once per rebalancing mode
(`fl_app.data.rebalance`) and seed. Printed: a Markdown table of the final centralized
accuracy and the final model's worst class recall on the server's test set
(history.json's `summary.worst_class_recall`), mean ± std over the seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from fl_app.data.rebalance import MODES
from scripts.bench.common import run_history
from scripts.bench.results_page import add_results_option, write_markdown

PARTITIONS = {
    "pathological (2 classes per client)": "partitioner='pathological' classes-per-partition=2",
    "dirichlet α=0.1": "partitioner='dirichlet' dirichlet-alpha=0.1",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default, what in (("--clients", 10, "simulated clients"),
                                ("--rounds", 20, "rounds per run"), ("--seeds", 3, "seeds 1..N")):
        parser.add_argument(flag, type=int, default=default, help=f"{what} ({default})")
    add_results_option(parser)
    return parser.parse_args(argv)


def mean_std(values: list[float]) -> str:
    """`mean ± std` (0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {std:.3f}"


def main(argv: list[str] | None = None) -> int:
    """Run every partition, mode and seed; print the table."""
    args = parse_args(argv)
    start = time.monotonic()
    lines = ["| partition | rebalance | final accuracy | worst class recall |",
             "|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="rebalance-") as scratch:
        for partition, partition_config in PARTITIONS.items():
            for mode in MODES:
                accuracy, worst = [], []
                for seed in range(1, args.seeds + 1):
                    config = (f"{partition_config} rebalance='{mode}' "
                              f"num-server-rounds={args.rounds} seed={seed}")
                    out = Path(scratch) / f"{len(lines)}-{seed}"
                    summary = run_history(args.clients, config, out)["summary"]
                    accuracy.append(summary["metrics"]["centralized"]["accuracy"]["final"])
                    worst.append(summary["worst_class_recall"])
                    print(f"{partition} | {mode} | seed {seed} | accuracy {accuracy[-1]:.4f} "
                          f"| worst class recall {worst[-1]:.4f}", flush=True)
                lines.append(f"| {partition} | {mode} | {mean_std(accuracy)} | "
                             f"{mean_std(worst)} |")
    summary = (f"{args.seeds} seeds, {args.rounds} rounds, {args.clients} clients: "
               f"{(time.monotonic() - start) / 60:.1f} min")
    print("\n".join(lines))
    print(summary)
    if not args.no_results:  # the summary below the table, not a row of it
        write_markdown("rebalance", "\n".join(lines) + "\n\n" + summary,
                       "scripts.bench.rebalance")
    return 0


if __name__ == "__main__":
    sys.exit(main())
