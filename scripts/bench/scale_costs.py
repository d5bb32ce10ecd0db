"""Benchmark: what SecAgg+, HE, compression and DP cost at 4.8k and at 1 M weights (issue 20).

    python -m scripts.bench.scale_costs [--sizes 4.8k 1m] [--modes plain secagg+ he top-k int8 dp
                                  dp-c0.03] [--clients 5] [--rounds 10] [--he-rounds N]
                                  [--local-epochs 2] [--json FILE] [--out DIR]

Each mode runs the app through `run_simulation.py`'s own path (`fl_app.cli.simulate`, so
HE gets its fresh keys and its decrypted final model) at each size, side by side in one
process, on the same workload: `--clients` IID clients, all sampled every round, `--rounds`
rounds of `--local-epochs` local epochs, no distributed evaluation (`--he-rounds` gives HE
fewer: its per-round costs do not depend on the rounds, and its aggregate is plaintext's
within 1e-8 relative). The sizes: `4.8k` is the default `mlp` (4,810 weights) on digits,
`1m` is `cnn-1m` (1,077,674 weights) on `synthetic-images` (5,000 images, default noise)
with learning rate 0.05 (at the builder's SGD(0.1) it leaves chance level only after about
8 rounds and then oscillates). The modes (`MODES`): plaintext weighted-fedavg, SecAgg+,
CKKS homomorphic encryption, top-k 1% uploads with error feedback, int8 uploads, and
server-side DP (`dp-fixed`, z=1) at the privacy–utility table's clipping norm C=0.3 and at C=0.03.

Per mode and size it prints:
  * bytes up and down per client per round, from each round's record in history.json
    (the `Parameters` tensors of every FitRes and FitIns; under SecAgg+ every protocol
    message's records, counted at the Grid: a slightly larger unit), rounds 2..N (under
    HE round 1 broadcasts the plaintext initial model);
  * client CPU seconds per client per round: the CPU time of the client's process (every
    thread, TensorFlow's included) from each fit message's arrival at the ClientApp's
    outermost mod (`fl_app.client.timing.message_seconds_mod`) to its reply, summed over
    the round's fit messages (one in plaintext, SecAgg+'s four stages), round 1 left out
    (model build, data load, first trace); its wall seconds next to it;
  * server CPU seconds per round: the server process's CPU time during the fit
    (`server_cpu_seconds.fit` in history.json: configure, send, receive, decode, aggregate,
    SecAgg+'s unmasking; in simulation also the engine's transport; the clients train in
    Ray's worker processes), median of rounds 2..N;
  * final accuracy: the final model's (`final_model.keras`, under HE the key holder's
    decrypted one) on the server's test set;
and each figure over the plaintext run's at the same size. CPU seconds are this process's
and the workers' own, so other jobs on the machine change them less than wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from flwr.app import MessageType

from fl_app.app.logs import quiet_libraries
from fl_app.cli import simulate
from fl_app.client.timing import JsonLinesSink, MessageSeconds, message_seconds_mod
from fl_app.server.outputs import read_history
from scripts.bench.homomorphic import final_model_accuracy
from scripts.bench.results_page import add_results_option, recorded

ROOT = Path(__file__).resolve().parents[2]

# size -> (what it is, its run-config)
SIZES = {
    "4.8k": ("mlp, digits (4,810 weights)", "model='mlp' dataset='digits'"),
    "1m": ("cnn-1m, synthetic-images (1,077,674 weights)",
           "model='cnn-1m' dataset='synthetic-images' synthetic-images-samples=5000 "
           "learning-rate=0.05"),
}
# mode -> its run-config on top of plaintext weighted-fedavg
MODES = {
    "plain": "",
    "secagg+": "secure-aggregation='secagg+' examples-cap-factor=0.0",
    "he": "homomorphic-encryption='ckks'",
    "top-k": "compress-up='top-k' compress-top-k=0.01 error-feedback=true",
    "int8": "compress-up='int8'",
    "dp": "strategy='dp-fixed' noise-multiplier=1.0 clipping-norm=0.3 dp-noise-seed=1",
    "dp-c0.03": "strategy='dp-fixed' noise-multiplier=1.0 clipping-norm=0.03 dp-noise-seed=1",
}
ATTEMPTS = 3


@dataclass
class Row:
    """One mode at one size: the figures the table prints."""

    size: str
    mode: str
    rounds: int
    up: float  # bytes per client per round
    down: float
    client_cpu: float  # seconds per client per round
    client_wall: float
    server_cpu: float  # seconds per round
    accuracy: float


def run_config(args: argparse.Namespace, size: str, mode: str) -> str:
    """The `--run-config` of one mode at one size."""
    rounds = args.he_rounds if mode == "he" and args.he_rounds else args.rounds
    return (f"{SIZES[size][1]} {MODES[mode]} num-server-rounds={rounds} "
            f"local-epochs={args.local_epochs} fraction-evaluate=0 seed={args.seed}")


def client_seconds(messages: list[MessageSeconds], skip_first: bool) -> tuple[float, float]:
    """The mean CPU and wall seconds a client spent on one round's fit messages (summed
    per node and round; round 1 left out when `skip_first`)."""
    per_round: dict[tuple[int, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for m in messages:
        if m.message_type == MessageType.TRAIN and not (skip_first and m.group == "1"):
            totals = per_round[(m.node_id, m.group)]
            totals[0] += m.cpu
            totals[1] += m.wall
    if not per_round:
        raise ValueError("no fit message was timed")
    return (statistics.mean(t[0] for t in per_round.values()),
            statistics.mean(t[1] for t in per_round.values()))


def row_from(size: str, mode: str, history: dict, messages: list[MessageSeconds],
             accuracy: float) -> Row:
    """A table row from one run's history, its clients' message timings and its final
    accuracy; RuntimeError when a round had a failed client (a rejected update counts:
    DP's noise at 1 M weights gets every update rejected, see docs/privacy-security.md)."""
    rounds = [r for r in history["rounds"] if r["round"] > 0]
    for r in rounds:  # a rejected update still cost its bytes and seconds: it counts
        if r["fit"]["num_failures"]:
            raise RuntimeError(f"{size} {mode}: round {r['round']} had failed clients, so "
                               f"its figures are not a round's: {r['fit'].get('failures')}")
    later = rounds[1:] or rounds  # round 1 carries first-time costs
    cpu, wall = client_seconds(messages, skip_first=len(rounds) > 1)
    return Row(size, mode, len(rounds),
               up=sum(r["bytes"]["up"] for r in later) / sum(r["fit"]["num_clients"]
                                                               for r in later),
               down=sum(r["bytes"]["down"] for r in later) / sum(r["fit"]["num_sampled"]
                                                                 for r in later),
               client_cpu=cpu, client_wall=wall,
               server_cpu=statistics.median(r["server_cpu_seconds"]["fit"] for r in later),
               accuracy=accuracy)


def run(args: argparse.Namespace, size: str, mode: str, folder: Path) -> Row:
    """Run one mode at one size in this process; its row. A run that did not start (Ray
    given too little time on a loaded machine) or lost a client (Ray kills a worker when
    the machine runs low on memory) is run again from scratch, `ATTEMPTS` times in all."""
    attempt = 0
    while True:
        attempt += 1
        out = folder / f"{size}-{mode}-{attempt}"
        sink = JsonLinesSink(str(folder / f"{size}-{mode}-{attempt}.jsonl"))
        sim_args = simulate.parse_args(["--num-supernodes", str(args.clients), "--out", str(out),
                                        "--run-config", run_config(args, size, mode)])
        cfg = simulate.prepare(sim_args)
        try:
            simulate.simulate(cfg, sim_args, outer_mods=[message_seconds_mod(sink)])
            return row_from(size, mode, read_history(out), sink.read(),
                            final_model_accuracy(out))
        except RuntimeError as err:
            if attempt == ATTEMPTS:
                raise
            print(f"{size} {mode}: attempt {attempt} failed ({str(err)[:300]}); retrying",
                  flush=True)


def ratio(value: float, base: float) -> str:
    """`value / base` as `N.NNx` (or `–` without a base)."""
    return f"{value / base:.3g}x" if base else "–"


def markdown(rows: list[Row]) -> str:
    """The table as Markdown: each size's rows, each figure with its ratio to plaintext."""
    plain = {r.size: r for r in rows if r.mode == "plain"}
    lines = ["| size | mode | rounds | bytes up / client / round | bytes down / client / round | "
             "client CPU s / client / round (wall) | server CPU s / round | final accuracy |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        base = plain.get(r.size)

        def cell(value: float, fmt: str, attribute: str, r: Row = r,
                 base: Row | None = base) -> str:
            text = format(value, fmt)
            if base is None or r is base:
                return text
            return f"{text} ({ratio(value, getattr(base, attribute))})"

        lines.append(f"| {r.size} | {r.mode} | {r.rounds} | {cell(r.up, ',.0f', 'up')} | "
                     f"{cell(r.down, ',.0f', 'down')} | "
                     f"{cell(r.client_cpu, '.3f', 'client_cpu')} ({r.client_wall:.3f}) | "
                     f"{cell(r.server_cpu, '.4f', 'server_cpu')} | {r.accuracy:.4f} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=SIZES)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--clients", type=int, default=5, help="simulated clients (5)")
    parser.add_argument("--rounds", type=int, default=10, help="rounds per run (10)")
    parser.add_argument("--he-rounds", type=int, default=0,
                        help="rounds of the HE runs (default: --rounds)")
    parser.add_argument("--local-epochs", type=int, default=2, help="local epochs (2)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--out", type=Path, default=None,
                        help="keep each run's outputs here (default: a temporary folder)")
    add_results_option(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run every mode at every size; print the rows as they come, then the table and the
    modes that failed every attempt (exit status 1 if any did)."""
    args = parse_args(argv)
    quiet_libraries(False)
    rows: list[Row] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="scale-costs-") as tmp:
        folder = args.out if args.out is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            for mode in args.modes:
                try:
                    rows.append(run(args, size, mode, folder))
                except RuntimeError as err:
                    failed.append(f"{size} {mode}: {str(err)[:300]}")
                    continue
                print(json.dumps(asdict(rows[-1])), flush=True)
                if args.json is not None:
                    args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    with recorded("scale-costs", "scripts.bench.scale_costs", write=not args.no_results):
        print(f"\n{args.clients} clients, {args.local_epochs} local epoch(s); sizes: "
              + "; ".join(f"{s} = {SIZES[s][0]}" for s in args.sizes))
        print(markdown(rows))
    for line in failed:
        print(f"failed, no row: {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
