"""The FedProx paper's straggler experiment on Synthetic(1,1): FedAvg dropping stragglers vs
FedProx (mu=1) keeping their partial work, at 0%, 50% and 90% stragglers.

    python -m scripts.bench.fedprox_stragglers              # the paper's 200 rounds (hours)
    python -m scripts.bench.fedprox_stragglers --rounds 20  # fewer rounds
    python -m scripts.bench.fedprox_stragglers --rounds 40 --fractions 0.9

Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020), section 5.2 and
its official code: 30 devices of Synthetic(1,1) (alpha, beta as standard deviations, sizes
lognormal(4, 2) + 50, uncapped), multinomial logistic regression, SGD lr 0.01, batch 10,
E = 20 local epochs, 10 devices sampled per round. Each round the straggler share of the
sampled devices can do only a random 1..E-1 epochs: FedAvg drops them, FedProx keeps their
partial work (`straggler-fraction`, `straggler-policy`; `strategies/stragglers.py`).
`--with-mu0` adds the paper's third curve, FedProx mu=0 keeping partial work. The paper
reports training loss and test accuracy curves, not a table of numbers; its finding is
printed next to ours.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from scripts.bench.common import run_accuracies, synthetic_devices, tail_mean
from scripts.bench.results_page import add_results_option, publish

FRACTIONS = (0.0, 0.5, 0.9)
DEVICES, PER_ROUND = 30, 10
PAPER_TREND = ("Paper (Fig. 1, Synthetic): with 0% stragglers FedProx mu>0 and FedAvg are "
               "close (mu>0 a little better on heterogeneous data); as stragglers grow to 50% "
               "and 90%, FedAvg, which drops them, degrades most and becomes unstable, while "
               "FedProx mu>0 keeping partial work stays robust (mu=0 keeping partial work "
               "lies in between).")
VARIANTS = {  # label -> run-config of the strategy and its straggler policy
    "FedAvg, drop": "strategy='weighted-fedavg' straggler-policy='drop'",
    "FedProx mu=1, keep": "strategy='fedprox' proximal-mu=1.0 straggler-policy='keep'",
}
MU0 = ("FedProx mu=0, keep", "strategy='fedprox' proximal-mu=0.0 straggler-policy='keep'")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200, help="rounds per run (200)")
    parser.add_argument("--local-epochs", type=int, default=20, help="E (20)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS),
                        help="straggler shares (0 0.5 0.9)")
    parser.add_argument("--with-mu0", action="store_true",
                        help="also run FedProx mu=0 keeping partial work")
    add_results_option(parser)
    return parser.parse_args(argv)


def run_config(args: argparse.Namespace, variant: str, fraction: float) -> str:
    """The `--run-config` of one cell."""
    return (f"{synthetic_devices(DEVICES, PER_ROUND)} validation-fraction=0.0 "
            f"fraction-evaluate=0.0 learning-rate=0.01 batch-size=10 "
            f"local-epochs={args.local_epochs} num-server-rounds={args.rounds} "
            f"min-fit-clients=1 straggler-fraction={fraction} seed={args.seed} {variant}")


def print_table(args: argparse.Namespace, results: dict[tuple[str, float], list[float]],
                labels: list[str]) -> None:
    """The table: final and mean-of-last-5-rounds accuracy per variant and straggler share."""
    from rich.table import Table

    table = Table(title=f"Synthetic(1,1), {DEVICES} devices, {PER_ROUND} a round, E="
                        f"{args.local_epochs}, {args.rounds} rounds: test accuracy "
                        "(final / mean of last 5 rounds)")
    table.add_column("variant")
    for fraction in args.fractions:
        table.add_column(f"{fraction:.0%} stragglers", justify="right")
    for label in labels:
        table.add_row(label, *(f"{results[label, f][-1]:.3f} / "
                               f"{tail_mean(results[label, f], 5):.3f}" for f in args.fractions))
    publish("fedprox-stragglers", table, "scripts.bench.fedprox_stragglers",
            write=not args.no_results)
    print(PAPER_TREND)


def main(argv: list[str] | None = None) -> int:
    """Run every variant at every straggler share; print the table and the paper's trend."""
    args = parse_args(argv)
    variants = dict(VARIANTS, **(dict([MU0]) if args.with_mu0 else {}))
    start = time.monotonic()
    results: dict[tuple[str, float], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="stragglers-") as scratch:
        for i, (label, variant) in enumerate(variants.items()):
            for j, fraction in enumerate(args.fractions):
                out = Path(scratch) / f"run-{i}-{j}"
                curve = run_accuracies(DEVICES, run_config(args, variant, fraction), out)
                results[label, fraction] = curve
                print(f"{label:>20} | {fraction:.0%} stragglers | accuracy {curve[-1]:.4f} | "
                      f"curve {' '.join(f'{a:.3f}' for a in curve)}", flush=True)
    print_table(args, results, list(variants))
    print(f"{len(results)} runs in {(time.monotonic() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
