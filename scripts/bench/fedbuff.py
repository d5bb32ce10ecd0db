"""Synchronous weighted FedAvg vs FedBuff with stragglers: time to the same accuracy.

    python -m scripts.bench.fedbuff        # digits, 10 clients, 30% of them 10x slower

Both runs use the same workload (digits, MLP, `--clients` simulated clients on Flower's
simulation engine, `--slow-client-fraction` of them `--slowdown` times slower, no
distributed evaluation) and the same seed. First synchronous `weighted-fedavg` runs
`--rounds` rounds; its last round's centralized accuracy is the target. Then FedBuff
(`server-loop='fedbuff'`) runs until it reaches that accuracy (`target`) or makes
`--max-versions` versions. Wall times are the server loop's, summed from the runs'
history.json `seconds` (round 0 to the end; both runs start every ClientApp before it:
the start-up is in "with start-up"). Every client gets its own simulation actor
(`--num-cpus-per-client` = CPUs / clients), so a straggler's wait does not hold back the
others: stragglers are slow devices, not a queue.

The table: strategy, final accuracy, wall time, time to reach the synchronous final
accuracy; then FedBuff's time to it as a fraction of synchronous FedAvg's wall time (the
issue asks for <= 1/2; the FedBuff paper reports a 3.3x speed-up over synchronous FL).
The exit status is 0 when FedBuff meets <= 1/2, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from fl_app.cli import simulate
from scripts.bench.common import table_parser, time_to, timeline
from scripts.bench.results_page import add_results_option, write_markdown

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = table_parser(__doc__, rounds=10, clients=10, seeds=None)
    parser.add_argument("--max-versions", type=int, default=300,
                        help="FedBuff: most model versions before giving up (300)")
    parser.add_argument("--slow-client-fraction", type=float, default=0.3)
    parser.add_argument("--slowdown", type=float, default=10.0)
    parser.add_argument("--buffer-size", type=int, default=3, help="FedBuff K (3)")
    parser.add_argument("--concurrency", type=int, default=0,
                        help="FedBuff: clients training at once (0: all)")
    parser.add_argument("--max-staleness", type=int, default=30)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default=None, help="keep the runs' folders here")
    add_results_option(parser)
    return parser.parse_args(argv)


def common_config(args: argparse.Namespace) -> str:
    """The run config both runs share."""
    # round-timeout makes the synchronous server start every ClientApp before round 1, as
    # FedBuff always does, so neither run's wall time counts the actors' start-up.
    return (f"seed={args.seed} local-epochs={args.local_epochs} fraction-evaluate=0 "
            f"round-timeout=1800 "
            f"slow-client-fraction={args.slow_client_fraction} "
            f"slow-client-slowdown={args.slowdown} "
            f"min-available-clients={args.clients}")


def run(args: argparse.Namespace, out: Path, run_config: str) -> dict[str, Any]:
    """One simulation; its history.json plus `total_seconds` (start-up included)."""
    started = time.perf_counter()
    cpus_per_client = (os.cpu_count() or 1) / args.clients  # one Ray actor per client
    code = simulate.main(["--num-supernodes", str(args.clients),
                          "--num-cpus-per-client", f"{cpus_per_client:g}",
                          "--run-config", f"{common_config(args)} {run_config}",
                          "--out", str(out)])
    total = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"run {run_config!r} failed with exit code {code}")
    history = json.loads((out / "history.json").read_text(encoding="utf-8"))
    history["total_seconds"] = total
    return history


def staleness(history: dict[str, Any]) -> str:
    """Mean and max staleness over FedBuff's versions, and the updates rejected as stale."""
    fits = [r["fit"] for r in history["rounds"] if "fit" in r]
    mean = sum(f["staleness_mean"] * f["num_clients"] for f in fits) / max(
        1, sum(f["num_clients"] for f in fits))
    return (f"staleness mean {mean:.2f}, max {max(f['staleness_max'] for f in fits)}, "
            f"{sum(f['num_stale'] for f in fits)} updates rejected as too stale")


def main(argv: list[str] | None = None) -> int:
    """Run synchronous FedAvg, then FedBuff to its final accuracy; print the table."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fedbuff-bench-") as scratch:
        folder = Path(args.out or scratch)
        sync = run(args, folder / "sync",
                   f"strategy='weighted-fedavg' num-server-rounds={args.rounds}")
        sync_points = timeline(sync)
        sync_final = sync_points[-1][1]
        buff = run(args, folder / "fedbuff",
                   f"server-loop='fedbuff' strategy='weighted-fedavg' "
                   f"num-server-rounds={args.max_versions} target={sync_final} "
                   f"fedbuff-buffer-size={args.buffer_size} "
                   f"fedbuff-concurrency={args.concurrency} "
                   f"fedbuff-max-staleness={args.max_staleness}")
    buff_points = timeline(buff)
    rows = [("weighted-fedavg (sync)", sync, sync_points, f"{args.rounds} rounds"),
            (f"fedbuff K={args.buffer_size}", buff, buff_points,
             f"{len(buff_points) - 1} versions")]
    lines = [f"{args.clients} clients on digits, {args.slow_client_fraction:.0%} of them "
             f"{args.slowdown:g}x slower, local-epochs {args.local_epochs}, seed {args.seed}",
             f"| strategy | final accuracy | wall time (s) | time to {sync_final:.4f} (s) "
             "| with start-up (s) | length |", "|---|---:|---:|---:|---:|---|"]
    for name, history, points, length in rows:
        reach = time_to(points, sync_final)
        lines.append(f"| {name} | {points[-1][1]:.4f} | {points[-1][0]:.1f} | "
                     f"{'never' if reach is None else f'{reach:.1f}'} | "
                     f"{history['total_seconds']:.1f} | {length} |")
    print("\n" + "\n".join(lines))
    notes = [f"FedBuff: {staleness(buff)}"]
    reach = time_to(buff_points, sync_final)
    ratio: float | None = None
    if reach is None:
        notes.append("FedBuff never reached the synchronous final accuracy")
    else:
        ratio = reach / sync_points[-1][0]
        notes.append(f"FedBuff reached it in {ratio:.2f} of synchronous FedAvg's wall time "
                     f"({1 / ratio:.1f}x faster; required: <= 0.50)")
        # Round / version 1 holds every client's first fit (Keras traces its train step) and
        # a straggler's first fit is that slow times the slowdown: the steady state without it.
        steady = (reach - buff_points[1][0]) / (sync_points[-1][0] - sync_points[1][0])
        notes.append(f"after round / version 1: {steady:.2f} of synchronous FedAvg's wall time")
    print("\n".join(notes))
    if not args.no_results:  # the notes a paragraph each, not rows of the table
        write_markdown("fedbuff", "\n".join(lines) + "\n\n" + "\n\n".join(notes),
                       "scripts.bench.fedbuff")
    return 0 if ratio is not None and ratio <= 0.5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
