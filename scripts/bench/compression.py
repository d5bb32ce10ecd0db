"""Accuracy against bytes on the wire for each update codec, with and without error feedback.

    python -m scripts.bench.compression                     # 10 runs, ~40 min on 2 cores
    python -m scripts.bench.compression --settings none top-k:ef --rounds 5

Every run is the default workload (digits, MLP, local-epochs 5) on Flower's simulation
engine, `--clients` clients (10) partitioned by Dirichlet α (`--alpha`, 0.3), at equal
rounds (`--rounds`, 20). The bytes are the ones each run's `history.json` records (the
serialized `Parameters` tensors of every `FitRes`, up, and `FitIns`, down, summed over the
rounds), not estimates. The table gives final centralized accuracy, upload and download
bytes, their ratio to the uncompressed (float32) run and the accuracy difference, and
checks the issue's targets: int8 within 0.01 of float32 at ≤ 1/4 of its upload bytes,
top-k at 1% with error feedback within 0.03 at ≤ 1/20.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fl_app.cli import simulate
from scripts.bench.results_page import add_results_option, publish

ROOT = Path(__file__).resolve().parents[2]

# name -> (compress-up, error-feedback, compress-down)
SETTINGS = {
    "none": ("none", False, "none"),
    "fp16": ("fp16", False, "none"),
    "fp16:ef": ("fp16", True, "none"),
    "int8": ("int8", False, "none"),
    "int8:ef": ("int8", True, "none"),
    "int8-channel": ("int8-channel", False, "none"),
    "int8-channel:ef": ("int8-channel", True, "none"),
    "top-k": ("top-k", False, "none"),
    "top-k:ef": ("top-k", True, "none"),
    "int8:ef+down-int8": ("int8", True, "int8"),
}
# setting -> (largest upload ratio to float32, largest accuracy loss): the targets
TARGETS = {"int8": (1 / 4, 0.01), "top-k:ef": (1 / 20, 0.03)}


@dataclass
class Result:
    """One run's final accuracy and total bytes."""

    accuracy: float
    up: int
    down: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10, help="simulated clients (10)")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per run (20)")
    parser.add_argument("--alpha", type=float, default=0.3, help="Dirichlet alpha (0.3)")
    parser.add_argument("--top-k", type=float, default=0.01, help="top-k fraction (0.01)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=None,
                        help="keep each run's outputs here (default: a temporary folder)")
    add_results_option(parser)
    return parser.parse_args(argv)


def run_config(args: argparse.Namespace, setting: str) -> str:
    """The `--run-config` of one row of the table."""
    up, feedback, down = SETTINGS[setting]
    return (f"num-server-rounds={args.rounds} partitioner='dirichlet' "
            f"dirichlet-alpha={args.alpha} fraction-evaluate=0 seed={args.seed} "
            f"compress-up='{up}' error-feedback={str(feedback).lower()} "
            f"compress-down='{down}' compress-top-k={args.top_k}")


def run(args: argparse.Namespace, setting: str, out: Path) -> Result:
    """Run one simulation; return its final accuracy and the bytes its rounds recorded."""
    code = simulate.main(["--num-supernodes", str(args.clients),
                          "--run-config", run_config(args, setting), "--out", str(out)])
    if code != 0:
        raise SystemExit(f"run {setting} failed with exit code {code}")
    rounds = json.loads((out / "history.json").read_text(encoding="utf-8"))["rounds"]
    trained = [r for r in rounds if "bytes" in r]
    return Result(float(rounds[-1]["centralized"]["accuracy"]),
                  sum(r["bytes"]["up"] for r in trained),
                  sum(r["bytes"]["down"] for r in trained))


def verdicts(results: dict[str, Result]) -> list[str]:
    """One line per target the results allow checking."""
    base = results.get("none")
    lines = []
    for setting, (max_ratio, max_loss) in TARGETS.items():
        if base is None or setting not in results:
            continue
        got = results[setting]
        ratio, loss = got.up / base.up, base.accuracy - got.accuracy
        ok = ratio <= max_ratio and loss <= max_loss
        lines.append(f"{setting}: upload {ratio:.4f} of float32 (target ≤ {max_ratio:.4f}), "
                     f"accuracy {loss:+.4f} below (target ≤ {max_loss}): "
                     f"{'met' if ok else 'NOT met'}")
    return lines


def print_table(args: argparse.Namespace, results: dict[str, Result], minutes: float) -> None:
    """A rich table of the results, then the targets' verdicts."""
    from rich.console import Console
    from rich.table import Table

    base = results.get("none")
    table = Table(title=f"Accuracy vs bytes: digits, Dirichlet α={args.alpha:g}, "
                        f"{args.clients} clients, {args.rounds} rounds ({minutes:.0f} min)")
    for column in ("setting", "compress-up", "error feedback", "compress-down", "accuracy",
                   "Δ accuracy", "bytes up", "up / float32", "bytes down", "down / float32"):
        table.add_column(column, justify="left" if column == "setting" else "right")
    for setting, res in results.items():
        up, feedback, down = SETTINGS[setting]
        table.add_row(
            setting, up if up != "top-k" else f"top-k {args.top_k:g}",
            "yes" if feedback else "no", down, f"{res.accuracy:.4f}",
            f"{res.accuracy - base.accuracy:+.4f}" if base else "", str(res.up),
            f"{res.up / base.up:.4f}" if base else "", str(res.down),
            f"{res.down / base.down:.4f}" if base else "")
    console = Console(width=160)
    publish("compression", table, "scripts.bench.compression", console,
            write=not args.no_results)
    for line in verdicts(results):
        console.print(line)


def main(argv: list[str] | None = None) -> int:
    """Run every setting and print the table."""
    args = parse_args(argv)
    start = time.monotonic()
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="compression-") as tmp:
        folder = args.out if args.out is not None else Path(tmp)
        for setting in args.settings:
            results[setting] = run(args, setting, folder / setting.replace(":", "-"))
            print(f"{setting}: accuracy {results[setting].accuracy:.4f}, "
                  f"up {results[setting].up} B, down {results[setting].down} B", flush=True)
    print_table(args, results, (time.monotonic() - start) / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
