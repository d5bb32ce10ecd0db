"""Table: the final model as float32 and as its int8 copies (`export-int8`), size and accuracy.

    python -m scripts.bench.export_int8 [--runs "model='mlp'" "model='cnn'"] [--clients 10]

Each run is the default job with `export-int8=true` plus the run's overrides
(`run_simulation.py --num-supernodes N --run-config "export-int8=true <overrides>"`, in this
process); the table is read from each history.json's `summary.export`: every file's size,
and its accuracy and loss on the server's test set (the float model's compiled loss and
metrics, `fl_app.server.export`).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from scripts.bench.common import timed_run
from scripts.bench.results_page import add_results_option, recorded

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["model='mlp'", "model='cnn'"],
                        help="run-config overrides, one run each")
    parser.add_argument("--clients", type=int, default=10, help="simulated clients (10)")
    add_results_option(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run each configuration and print the table."""
    args = parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="export-table-") as folder:
        for i, overrides in enumerate(args.runs):
            history, _ = timed_run(f"export-int8=true {overrides}", args.clients,
                                   Path(folder) / str(i))
            for variant, row in history["summary"]["export"].items():
                rows.append((overrides, variant, row))
    with recorded("export-int8", "scripts.bench.export_int8", write=not args.no_results):
        print("\n| run | variant | file | bytes | × float32 | accuracy | loss |")
        print("|---|---|---|---:|---:|---:|---:|")
        float_bytes: dict[str, int] = {}
        for overrides, variant, row in rows:
            float_bytes.setdefault(overrides, row["bytes"])
            print(f"| `{overrides}` | {variant} | {row['file']} | {row['bytes']:,} | "
                  f"{row['bytes'] / float_bytes[overrides]:.3f} | "
                  f"{row.get('accuracy', float('nan')):.4f} | "
                  f"{row['loss']:.4f} |")


if __name__ == "__main__":
    main()
