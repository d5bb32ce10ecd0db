"""Benchmark: many virtual clients on Flower's simulation engine (issue 20, item 4).

    python scripts/scale_clients.py many --clients 10000 --per-round 100 --rounds 30
    python scripts/scale_clients.py many --clients 1000 --per-round 100 --rounds 30 \\
        --model cnn-1m --dataset synthetic-images
    python scripts/scale_clients.py costs [--nodes 1000 4000] [--messages 100]

`many` runs the app as `run_simulation.py --num-supernodes N` does (`fl_app.cli.simulate`:
the same config resolution, preflight, private Ray and Flower `run_simulation`), in this
process, with `fraction-fit` = per-round / clients, one local epoch and no distributed
evaluation (`fraction-evaluate=0`: every round is 100 fits and one centralized evaluation).
`dataset=synthetic` gets `synthetic-num-users` = N (one user per client) and
`synthetic-max-samples` 100; `synthetic-images` gets 16 training images per client. A
run callback samples, after each round's record, the resident (RSS) and unique (USS)
memory of this process (the ServerApp, Flower's simulation engine and its link state) and of
every Ray `ClientAppActor` below it (the workers that run the ClientApps). It prints the
start-up (clients warmed up), the seconds per round from history.json, the memory at the
rounds asked (`--at`, default 1, 10 and the last) and the growth from the first of them to
the last, and writes it all as JSON (`--json`).

`costs` measures, without Ray or TensorFlow, the per-client costs that decide a larger run:
  * Flower's dispatch: the in-memory link state's `get_message_ins(node_id, limit=1)` for
    every node (what the simulation engine's `add_messages_to_queue` does every 0.1 s) with
    M instructions stored: the seconds per (node x stored message);
  * memory per virtual node in Flower's engine (link-state node, `DeprecatedRunInfoStore`
    with its Context) and per client in the server's `SeededClientManager` (its
    `GridClientProxy` wrapped as every run wraps it, and its cached key);
  * generating and partitioning the data: `dataset=synthetic` for N users (seconds and
    bytes per user) and one client's partition load.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fl_app.server.callbacks import Callback  # noqa: E402

WORKER_TITLE = "ray::ClientAppActor"
MIB = 2**20


def process_memory(proc: psutil.Process) -> dict[str, float]:
    """`proc`'s RSS and USS in MiB (USS: the pages no other process shares)."""
    info = proc.memory_full_info()
    return {"rss": info.rss / MIB, "uss": info.uss / MIB}


def ray_workers(root: psutil.Process) -> list[psutil.Process]:
    """The Ray `ClientAppActor` processes below `root` (Ray's raylet, which this process
    starts, starts them), so another user's Ray on the machine is not counted."""
    workers = []
    for child in root.children(recursive=True):
        try:
            if child.cmdline()[:1] == [WORKER_TITLE]:
                workers.append(child)
        except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
            continue
    return workers


def memory_sample(root: psutil.Process) -> dict[str, Any]:
    """RSS/USS of `root` (`server`) and of each Ray worker below it (`workers`: by pid)."""
    workers = {}
    for worker in ray_workers(root):
        try:
            workers[str(worker.pid)] = process_memory(worker)
        except psutil.NoSuchProcess:
            continue
    return {"server": process_memory(root), "workers": workers}


class MemorySampler(Callback):
    """A run callback that records `memory_sample` of this process after the run's first
    record (`0`: clients up, before round 1) and after every round, with the time."""

    def __init__(self) -> None:
        self.root = psutil.Process(os.getpid())
        self.samples: dict[int, dict[str, Any]] = {}
        self.startup_seconds: float | None = None

    def on_run_begin(self, config: Mapping[str, Any], startup_seconds: float) -> None:
        """Record the start-up seconds and the memory before round 1."""
        self.startup_seconds = startup_seconds
        self.samples[0] = memory_sample(self.root)

    def on_round_end(self, server_round: int, record: dict[str, Any]) -> None:
        """Record the memory after `server_round`."""
        if server_round > 0:
            self.samples[server_round] = memory_sample(self.root)


def growth(first: float, last: float) -> float:
    """`last` over `first` as a percentage change."""
    return 100.0 * (last - first) / first


def memory_rows(samples: Mapping[int, Mapping[str, Any]], rounds: Sequence[int]
                ) -> list[tuple[str, list[float], float]]:
    """(what, [MiB at each of `rounds`], growth % from the first to the last) for the
    server's RSS and USS and each worker's (the workers alive at every one of `rounds`)."""
    rows = []
    for kind in ("rss", "uss"):
        values = [samples[r]["server"][kind] for r in rounds]
        rows.append((f"server {kind.upper()}", values, growth(values[0], values[-1])))
    pids = set.intersection(*(set(samples[r]["workers"]) for r in rounds))
    for number, pid in enumerate(sorted(pids, key=int), start=1):
        for kind in ("rss", "uss"):
            values = [samples[r]["workers"][pid][kind] for r in rounds]
            rows.append((f"worker {number} {kind.upper()}", values,
                         growth(values[0], values[-1])))
    return rows


def run_overrides(args: argparse.Namespace) -> str:
    """The `--run-config` string of a `many` run."""
    fraction = args.per_round / args.clients
    keys = {"num-server-rounds": args.rounds, "model": f"'{args.model}'",
            "dataset": f"'{args.dataset}'", "fraction-fit": fraction, "fraction-evaluate": 0.0,
            "min-fit-clients": min(2, args.per_round), "local-epochs": 1, "seed": args.seed}
    if args.dataset == "synthetic":
        keys.update({"synthetic-num-users": args.clients, "synthetic-max-samples": 100})
    elif args.dataset == "synthetic-images":
        # 16 training images a client after the test fraction (0.2) is held out
        keys["synthetic-images-samples"] = 20 * args.clients
    return " ".join(f"{key}={value}" for key, value in keys.items())


def run_many(args: argparse.Namespace) -> dict[str, Any]:
    """Run the simulation with a `MemorySampler`; its figures as a JSON-able dict."""
    from fl_app.cli import simulate
    from fl_app.server.outputs import read_history

    overrides = run_overrides(args)
    with tempfile.TemporaryDirectory(prefix="scale-") as out:
        sim_args = simulate.parse_args(["--num-supernodes", str(args.clients),
                                        "--run-config", overrides, "--out", out])
        sampler = MemorySampler()
        start = time.perf_counter()
        cfg = simulate.prepare(sim_args)
        wall = simulate.simulate(cfg, sim_args, callbacks=[sampler])
        history = read_history(Path(out))
    seconds = {int(r["round"]): float(r["seconds"]) for r in history["rounds"] if r["round"] > 0}
    return {"clients": args.clients, "per_round": args.per_round, "model": args.model,
            "dataset": args.dataset, "run_config": overrides,
            "startup_seconds": sampler.startup_seconds,
            "total_seconds": time.perf_counter() - start, "simulate_seconds": wall,
            "round_seconds": seconds, "memory": sampler.samples,
            "accuracy": [r["centralized"].get("accuracy") for r in history["rounds"]],
            "load_average": os.getloadavg()}


def print_many(result: Mapping[str, Any], at: Sequence[int]) -> None:
    """The `many` tables: seconds per round, memory at the rounds `at` with growth."""
    seconds = {int(k): v for k, v in result["round_seconds"].items()}
    samples = {int(k): v for k, v in result["memory"].items()}
    rounds = [r for r in at if r in samples]
    values = [seconds[r] for r in sorted(seconds)]
    print(f"\n{result['model']} on {result['dataset']}: {result['clients']:,} clients, "
          f"{result['per_round']} a round, {len(values)} rounds")
    print(f"start-up (engine, Ray, every client warmed up): {result['startup_seconds']:.1f} s; "
          f"whole run {result['total_seconds']:.1f} s; load average {result['load_average']}")
    print(f"seconds per round: mean {statistics.mean(values):.2f}, median "
          f"{statistics.median(values):.2f}, round 1 {values[0]:.2f}, min {min(values):.2f}, "
          f"max {max(values):.2f}")
    acc = result["accuracy"]
    print(f"centralized accuracy: round 0 {acc[0]:.4f}, last {acc[-1]:.4f}")
    header = " | ".join(f"round {r}" for r in rounds)
    print(f"| MiB | {header} | growth {rounds[0]}->{rounds[-1]} |")
    print("|---|" + "---|" * len(rounds) + "---|")
    for what, mib, change in memory_rows(samples, rounds):
        cells = " | ".join(f"{v:,.1f}" for v in mib)
        print(f"| {what} | {cells} | {change:+.1f}% |")


def time_per_call(fn: Callable[[], object], min_seconds: float = 0.5) -> float:
    """Seconds per call of `fn`, repeated for at least `min_seconds`."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def traced_bytes(build: Callable[[], object]) -> tuple[object, int]:
    """What `build` returns and the bytes Python allocated for it (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    made = build()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return made, after - before


def flower_engine(num_nodes: int) -> tuple[Any, dict[int, int], int]:
    """Flower's in-memory link state with a run and `num_nodes` nodes registered as the
    simulation engine registers them: (state, node id -> partition, run id)."""
    from flwr.common.typing import RunStatus
    from flwr.server.superlink.fleet.vce.vce_api import _register_nodes
    from flwr.server.superlink.linkstate import LinkStateFactory
    from flwr.supercore.constant import FLWR_IN_MEMORY_DB_NAME

    factory = LinkStateFactory(FLWR_IN_MEMORY_DB_NAME, None)  # type: ignore[arg-type]
    state = factory.state()
    run_id = state.create_run(None, None, None, {}, None, None, "")  # type: ignore[arg-type]
    state.update_run_status(run_id, RunStatus("running", "", ""))
    return state, _register_nodes(num_nodes, factory), run_id


def dispatch_seconds(num_nodes: int, num_messages: int) -> dict[str, float]:
    """One sweep of the simulation engine's dispatcher over `num_nodes` nodes with
    `num_messages` instructions (to distinct nodes) stored, as `add_messages_to_queue` makes
    it, and the seconds per (node x stored message)."""
    from flwr.common import Message, RecordDict
    from flwr.common.constant import SUPERLINK_NODE_ID

    state, mapping, run_id = flower_engine(num_nodes)
    nodes = list(mapping)
    for node_id in nodes[:num_messages]:
        msg = Message(RecordDict(), dst_node_id=node_id, message_type="query")
        msg.metadata.__dict__.update(_run_id=run_id, _src_node_id=SUPERLINK_NODE_ID,
                                     _message_id=msg.object_id)
        state.store_message_ins(msg)

    def sweep() -> None:
        for node_id in nodes:
            state.get_message_ins(node_id=node_id, limit=1)

    stored = len(state.message_ins_store)
    seconds = time_per_call(sweep)
    return {"nodes": num_nodes, "stored": stored, "sweep_seconds": seconds,
            "per_pair_us": 1e6 * seconds / (num_nodes * max(stored, 1))}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    many = sub.add_parser("many", help="run the simulation with many clients")
    many.add_argument("--clients", type=int, default=10_000)
    many.add_argument("--per-round", type=int, default=100)
    many.add_argument("--rounds", type=int, default=30)
    many.add_argument("--model", default="mlp")
    many.add_argument("--dataset", default="synthetic",
                      choices=["synthetic", "synthetic-images"])
    many.add_argument("--seed", type=int, default=42)
    many.add_argument("--at", type=int, nargs="+", default=None,
                      help="rounds whose memory is shown (default: 1, 10 and the last)")
    many.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the chosen measurement and print its tables."""
    args = parse_args(argv)
    if args.command == "many":
        result = run_many(args)
        if args.json is not None:
            args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
        print_many(result, args.at or sorted({1, min(10, args.rounds), args.rounds}))


if __name__ == "__main__":
    main()
