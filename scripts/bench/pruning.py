"""Accuracy against sparsity and upload bytes for magnitude pruning (`prune-sparsity`).

    python -m scripts.bench.pruning                       # 5 runs, ~10 min on 2 cores
    python -m scripts.bench.pruning --sparsities 0 0.8 --rounds 5

Every run is the default workload (digits, MLP, 10 clients, iid, local-epochs 5,
`--rounds` 20) through `run_simulation.py`'s entry point: first the float32 baseline (no
pruning, no codec: the main job), then one run per sparsity with `prune-rounds`
(`--prune-rounds`, 10) and the update sent by `compress-up='top-k'` at
`compress-top-k=1.0`, which sends every entry that is not exactly zero as a uint32 index
and a float32 value: lossless, so pruned weights cost nothing and the accuracy is the
pruned model's. For each run: final centralized accuracy, the kernels' sparsity in its
`final_model.keras`, and the upload bytes per client per round from `history.json` (each
round's `bytes.up` over its answering clients): the mean over all rounds and the last
round's (at the target sparsity).
"""

from __future__ import annotations

import fl_app  # noqa: F401  (quiet TensorFlow start-up: before tensorflow)

# isort: split

import argparse
import tempfile
from pathlib import Path

import keras
import numpy as np

from fl_app.server.outputs import MODEL_FILE
from scripts.bench.common import timed_run
from scripts.bench.results_page import add_results_option, recorded

ROOT = Path(__file__).resolve().parents[2]

SPARSE = "compress-up='top-k' compress-top-k=1.0"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.9],
                        help="one pruned run each (0 0.5 0.8 0.9)")
    parser.add_argument("--prune-rounds", type=int, default=10,
                        help="rounds to reach the target sparsity (10)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per run (20)")
    parser.add_argument("--clients", type=int, default=10, help="simulated clients (10)")
    parser.add_argument("--seed", type=int, default=42)
    add_results_option(parser)
    return parser.parse_args(argv)


def kernel_sparsity(path: Path) -> float:
    """The share of exact zeros over every kernel (weight array of two or more axes)."""
    kernels = [w for w in keras.models.load_model(path).get_weights() if w.ndim >= 2]
    return float(sum(np.sum(w == 0) for w in kernels) / sum(w.size for w in kernels))


def row(label: str, overrides: str, args: argparse.Namespace, folder: Path) -> str:
    """One run's line of the table."""
    out = folder / label.replace(" ", "_")
    history, seconds = timed_run(f"num-server-rounds={args.rounds} seed={args.seed} "
                                 + overrides, args.clients, out)
    rounds = history["rounds"][1:]
    per_client = [r["bytes"]["up"] / r["fit"]["num_clients"] for r in rounds]
    accuracy = rounds[-1]["centralized"]["accuracy"]
    return (f"| {label} | {accuracy:.4f} | {kernel_sparsity(out / MODEL_FILE):.3f} | "
            f"{np.mean(per_client):.0f} | {per_client[-1]:.0f} | {seconds:.0f} |")


def main(argv: list[str] | None = None) -> None:
    """Run the baseline and one run per sparsity, then print the table."""
    args = parse_args(argv)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        lines.append(row("float32, no pruning", "", args, folder))
        for sparsity in args.sparsities:
            lines.append(row(f"top-k 1.0, sparsity {sparsity:.0%}",
                             f"{SPARSE} prune-sparsity={sparsity} "
                             f"prune-rounds={args.prune_rounds}", args, folder))
    with recorded("pruning", "scripts.bench.pruning", write=not args.no_results):
        print("| run | accuracy | kernel sparsity | bytes up / client / round (mean) | "
              "last round | seconds |")
        print("|---|---:|---:|---:|---:|---:|")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
