"""Privacy–utility table: final accuracy against ε for several noise multipliers.

    python -m scripts.bench.privacy_utility [--clients 100] [--fraction-fit 0.2] [--rounds 30]
        [--noise 0,0.5,1,2,4] [--clipping-norm 0.3] [--strategy dp-fixed]
        [--noise-seeds 1,2,3] [--out DIR]

Runs the default workload (digits, IID, MLP, 5 local epochs) split over `--clients`
simulated clients with `run_simulation.py`, once without DP (weighted-fedavg) and once
per noise multiplier with the DP strategy (noise 0: clipping only, no guarantee). Each
run is its own process, so no run starts from a model another run left in a cache.
Distributed evaluation is off (client-reported metrics are outside the DP guarantee);
accuracy is the server's centralized test accuracy after the last round, averaged over the
DP runs' noise seeds (`dp-noise-seed`, one run per `--noise-seeds` entry; seeded so that the
table can be reproduced, where a private deployment leaves `dp-noise-seed=0`, OS entropy).
Prints a table
(and its Markdown for docs/results.md) and writes privacy_utility.png/.json under `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fl_app.server.outputs import read_history
from scripts.bench.results_page import add_results_option, write_markdown

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--fraction-fit", type=float, default=0.2)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--noise", default="0,0.5,1,2,4",
                        help="comma-separated noise multipliers")
    parser.add_argument("--clipping-norm", type=float, default=0.3)
    parser.add_argument("--strategy", default="dp-fixed")
    parser.add_argument("--noise-seeds", default="1,2,3",
                        help="comma-separated dp-noise-seed values: one DP run per seed and "
                             "noise multiplier, accuracy averaged")
    parser.add_argument("--extra", default="", help="more run-config overrides for every run")
    parser.add_argument("--out", default=None, help="folder for the runs, plot and table")
    add_results_option(parser)
    return parser.parse_args(argv)


def run_one(out: Path, run_config: str, clients: int) -> dict:
    """One simulation (log in out/run.log); returns final accuracy, ε, δ and wall time."""
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "run.log", "w") as log:
        code = subprocess.call([sys.executable, str(ROOT / "run_simulation.py"),
                                "--num-supernodes", str(clients), "--run-config", run_config,
                                "--out", str(out)], stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        raise SystemExit(f"run failed ({code}), see {out / 'run.log'}: {run_config}")
    rounds = read_history(out)["rounds"]
    last = rounds[-1]
    privacy = last.get("privacy", {})
    return {"accuracy": last["centralized"]["accuracy"], "rounds": last["round"],
            "epsilon": privacy.get("epsilon", math.inf), "delta": privacy.get("delta"),
            "seconds": time.perf_counter() - start}


def rows_for(args: argparse.Namespace, out: Path) -> list[dict]:
    """Run the baseline and every noise multiplier."""
    common = (f"num-server-rounds={args.rounds} fraction-fit={args.fraction_fit} "
              f"fraction-evaluate=0 min-fit-clients=2 {args.extra}")
    runs: list[tuple[str, float | None, list[str]]] = [
        ("no DP (weighted-fedavg)", None, [f"{common} strategy='weighted-fedavg'"])]
    seeds = [int(seed) for seed in args.noise_seeds.split(",")]
    for noise in (float(z) for z in args.noise.split(",")):
        runs.append((f"{args.strategy} z={noise:g}", noise, [
            f"{common} strategy='{args.strategy}' noise-multiplier={noise} "
            f"clipping-norm={args.clipping_norm} dp-noise-seed={seed}" for seed in seeds]))
    rows = []
    for i, (label, multiplier, run_configs) in enumerate(runs):
        results = [run_one(out / f"run{i}-{j}", run_config, args.clients)
                   for j, run_config in enumerate(run_configs)]
        accuracies = [r["accuracy"] for r in results]
        rows.append({"run": label, "noise_multiplier": multiplier, **results[0],
                     "accuracy": statistics.mean(accuracies),
                     "accuracy_std": statistics.pstdev(accuracies), "accuracies": accuracies,
                     "seconds": sum(r["seconds"] for r in results)})
    return rows


def _accuracy(row: dict) -> str:
    if len(row["accuracies"]) == 1:
        return f"{row['accuracy']:.3f}"
    return f"{row['accuracy']:.3f} ± {row['accuracy_std']:.3f}"


def markdown(rows: list[dict]) -> str:
    """The table as Markdown (for docs/results.md)."""
    lines = ["| run | noise multiplier z | ε | final accuracy (mean ± std over noise seeds) |",
             "|---|---|---|---|"]
    for r in rows:
        z = "–" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:g}"
        eps = "∞" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.2f}"
        lines.append(f"| {r['run']} | {z} | {eps} | {_accuracy(r)} |")
    return "\n".join(lines)


def show(rows: list[dict], title: str) -> None:
    """Print the table with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("run", "z", "ε", "δ", "accuracy", "rounds", "seconds"):
        table.add_column(column, justify="right")
    for r in rows:
        z = "" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:g}"
        table.add_row(r["run"], z,
                      "∞" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.2f}",
                      "" if r["delta"] is None else f"{r['delta']:.2e}", _accuracy(r),
                      str(r["rounds"]), f"{r['seconds']:.0f}")
    Console().print(table)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Final accuracy against ε (finite ε only), the no-DP accuracy as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    finite = [r for r in rows if math.isfinite(r["epsilon"])]
    ax.plot([r["epsilon"] for r in finite], [r["accuracy"] for r in finite], marker="o",
            label="DP")
    for r in finite:
        ax.annotate(f"z={r['noise_multiplier']:g}", (r["epsilon"], r["accuracy"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    for color, r in enumerate(r for r in rows if math.isinf(r["epsilon"])):
        ax.axhline(r["accuracy"], linestyle="--", linewidth=1, color=f"C{color + 1}",
                   label=f"{r['run']} (ε=∞)")
    ax.set_xscale("log")
    ax.set_xlabel("ε (log scale)")
    ax.set_ylabel("final centralized accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the sweep, print the table and write the plot."""
    args = parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="privacy_utility_")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = rows_for(args, out)
    title = (f"digits, {args.clients} clients, {args.fraction_fit:g} sampled per round, "
             f"{args.rounds} rounds, C={args.clipping_norm:g} {args.extra}".strip())
    (out / "privacy_utility.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "privacy_utility.png", title)
    show(rows, title)
    print(markdown(rows))
    if not args.no_results:
        write_markdown("privacy-utility", markdown(rows), "scripts.bench.privacy_utility")
    print(f"runs, plot and table: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
