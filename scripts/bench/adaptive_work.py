"""Fixed vs adaptive local work with stragglers: rounds and wall time to a target accuracy.

    python -m scripts.bench.adaptive_work              # 3 seeds, 8 rounds, budget 0.15 s
    python -m scripts.bench.adaptive_work --seeds 1 --rounds 6

`--clients` clients on digits, `--slow-client-fraction` of them `--slowdown` times slower
(`slow-client-fraction`, `slow-client-slowdown`: their training runs that much slower, as
on a slower device), no distributed evaluation, every client on its own simulation actor
(`--num-cpus-per-client` = CPUs / clients), so a round lasts as long as its slowest client.
Variants: every client trains `--local-epochs` epochs (fixed, `weighted-fedavg`); every
client fills `round-time-budget` = `--budget` seconds from its measured speed
(`fl_app.client.adaptive_work`), with `weighted-fedavg` and with `fednova` (which
normalises the uneven work). Per variant and seed: the rounds and the wall seconds (the
server loop's, round 0 on, history.json `seconds`) until the centralized accuracy first
reaches `--target`, the mean seconds of a round from round 3 on (rounds 1 and 2 hold every
client's tracing of the train step, stretched too on a straggler, and the adaptive nodes'
measurement) and the final accuracy. The default budget is about what the fixed work takes
a fast client here, so the fast clients' work stays about the same and the stragglers' shrinks.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from scripts.bench.common import run_history, table_parser, time_to, timeline
from scripts.bench.results_page import add_results_option, write_markdown

VARIANTS = {  # label -> run-config of the variant (the budget added to the adaptive ones)
    "fixed, weighted-fedavg": "strategy='weighted-fedavg'",
    "adaptive, weighted-fedavg": "strategy='weighted-fedavg' round-time-budget={budget}",
    "adaptive, fednova": "strategy='fednova' round-time-budget={budget}",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = table_parser(__doc__, rounds=8)
    parser.add_argument("--local-epochs", type=int, default=20, help="fixed work (20)")
    parser.add_argument("--budget", type=float, default=0.15,
                        help="round-time-budget of the adaptive runs, seconds (0.15)")
    parser.add_argument("--target", type=float, default=0.95, help="accuracy (0.95)")
    parser.add_argument("--slow-client-fraction", type=float, default=0.3)
    parser.add_argument("--slowdown", type=float, default=10.0)
    add_results_option(parser)
    return parser.parse_args(argv)


def run_config(args: argparse.Namespace, variant: str, seed: int) -> str:
    """One run's `--run-config`: the variant's keys, then those every run shares."""
    return (f"{VARIANTS[variant].format(budget=args.budget)} seed={seed} "
            f"local-epochs={args.local_epochs} num-server-rounds={args.rounds} "
            f"fraction-evaluate=0.0 min-available-clients={args.clients} round-timeout=1800 "
            f"slow-client-fraction={args.slow_client_fraction} "
            f"slow-client-slowdown={args.slowdown}")


STEADY_FROM = 3  # the first round without tracing or measuring


def summary(history: dict[str, Any], target: float) -> dict[str, float | None]:
    """Rounds and seconds to `target`, mean seconds of a round from `STEADY_FROM` on and
    the final accuracy of one run."""
    points = timeline(history)
    reached = next((r for r, (_, acc) in enumerate(points) if acc >= target), None)
    steady = [float(r["seconds"]) for r in history["rounds"][STEADY_FROM:]]
    return {"rounds": reached, "seconds": time_to(points, target),
            "per_round": sum(steady) / len(steady), "final": points[-1][1]}


def _mean(values: list[float | None]) -> str:
    """The mean, or how many runs never got there."""
    missing = sum(v is None for v in values)
    if missing:
        return f"{missing}/{len(values)} never"
    return f"{sum(values) / len(values):.2f}"  # type: ignore[arg-type]


def print_table(args: argparse.Namespace, results: dict[tuple[str, int], dict]) -> None:
    """One row per variant: the means over the seeds (per seed in the lines above)."""
    lines = [f"digits, {args.clients} clients, {args.slow_client_fraction:.0%} of them "
             f"{args.slowdown:g}x slower, {args.rounds} rounds, fixed work {args.local_epochs} "
             f"local epochs, adaptive budget {args.budget:g} s, mean of {args.seeds} seed(s)",
             "", f"| variant | rounds to {args.target} | seconds to {args.target} | seconds "
             f"per round (from round {STEADY_FROM}) | final accuracy |",
             "|---|---:|---:|---:|---:|"]
    for variant in VARIANTS:
        runs = [results[variant, seed] for seed in range(1, args.seeds + 1)]
        lines.append(f"| {variant} | {_mean([r['rounds'] for r in runs])} | "
                     f"{_mean([r['seconds'] for r in runs])} | "
                     f"{_mean([r['per_round'] for r in runs])} | "
                     f"{sum(r['final'] for r in runs) / len(runs):.3f} |")
    print("\n" + "\n".join(lines))
    if not args.no_results:
        write_markdown("adaptive-work", "\n".join(lines), "scripts.bench.adaptive_work")


def main(argv: list[str] | None = None) -> int:
    """Run every variant for every seed; print the table."""
    args = parse_args(argv)
    start = time.monotonic()
    cpus_per_client = (os.cpu_count() or 1) / args.clients  # one actor per client
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="adaptive-") as scratch:
        for seed in range(1, args.seeds + 1):
            for index, variant in enumerate(VARIANTS):
                history = run_history(args.clients, run_config(args, variant, seed),
                                      Path(scratch) / f"{index}-{seed}",
                                      cpus_per_client=cpus_per_client)
                results[variant, seed] = summary(history, args.target)
                print(f"{variant:>26} | seed {seed} | {results[variant, seed]}", flush=True)
    print_table(args, results)
    print(f"{len(results)} runs in {(time.monotonic() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
