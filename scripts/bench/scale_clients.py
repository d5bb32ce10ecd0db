"""Benchmark: many virtual clients on Flower's simulation engine (issue 20, item 4).

    python -m scripts.bench.scale_clients many --clients 10000 --per-round 100 --rounds 30
    python -m scripts.bench.scale_clients many --clients 1000 --per-round 100 --rounds 30 \\
        --model cnn-1m --dataset synthetic-images
    python -m scripts.bench.scale_clients costs [--nodes 1000 10000] [--messages 0 100] \
        [--datasets synthetic synthetic-images]

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
    M instructions stored: wall and CPU seconds per sweep, per node and per (node x stored
    message) (the CPU time is what an idle machine would see);
  * memory per virtual node in Flower's engine (link-state node, `DeprecatedRunInfoStore`
    with its Context) and per client in the server's `SeededClientManager` (its
    `GridClientProxy` wrapped as every run wraps it, and its cached key);
  * generating and partitioning the data (`synthetic`, `synthetic-images`, sized as `many`
    sizes them): seconds and bytes per client of the build, the first partition load (the
    partitioner's build) and one client's partition load after it.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import psutil

from fl_app.data.types import DataSettings
from fl_app.flower_internals import engine_node_stores, grid_client_proxy, in_memory_engine
from fl_app.server.callbacks import Callback
from scripts.bench.results_page import add_results_option, recorded

ROOT = Path(__file__).resolve().parents[2]

WORKER_TITLE = "ray::ClientAppActor"
DATASETS = ("synthetic", "synthetic-images")
MIB = 2**20

T = TypeVar("T")


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


def data_keys(dataset: str, clients: int) -> dict[str, Any]:
    """The data's run-config keys for `clients` clients: `synthetic` gets one user a client
    of at most 100 samples, `synthetic-images` 16 training images a client (20 before the
    test fraction, 0.2, is held out)."""
    if dataset == "synthetic":
        return {"synthetic-num-users": clients, "synthetic-max-samples": 100}
    return {"synthetic-images-samples": 20 * clients}


def run_overrides(args: argparse.Namespace) -> str:
    """The `--run-config` string of a `many` run."""
    fraction = args.per_round / args.clients
    keys = {"num-server-rounds": args.rounds, "model": f"'{args.model}'",
            "dataset": f"'{args.dataset}'", "fraction-fit": fraction, "fraction-evaluate": 0.0,
            "min-fit-clients": min(2, args.per_round), "local-epochs": 1, "seed": args.seed,
            **data_keys(args.dataset, args.clients)}
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
    rounds = [r for r in history["rounds"] if r["round"] > 0]
    seconds = {int(r["round"]): float(r["seconds"]) for r in rounds}
    timings = [r["fit"]["timing"] for r in rounds if "timing" in r.get("fit", {})]
    client_seconds = {phase: statistics.mean(t.get(phase, 0.0) for t in timings)
                      for phase in sorted({p for t in timings for p in t})}
    return {"clients": args.clients, "per_round": args.per_round, "model": args.model,
            "dataset": args.dataset, "run_config": overrides,
            "startup_seconds": sampler.startup_seconds,
            "total_seconds": time.perf_counter() - start, "simulate_seconds": wall,
            "round_seconds": seconds, "memory": sampler.samples,
            "client_fit_seconds": client_seconds,
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
    phases = ", ".join(f"{phase} {value:.3f}" for phase, value in
                       result["client_fit_seconds"].items())
    print(f"a client's fit message, mean seconds per phase (fit.timing): {phases}")
    acc = result["accuracy"]
    print(f"centralized accuracy: round 0 {acc[0]:.4f}, last {acc[-1]:.4f}")
    header = " | ".join(f"round {r}" for r in rounds)
    print(f"| MiB | {header} | growth {rounds[0]}->{rounds[-1]} |")
    print("|---|" + "---|" * len(rounds) + "---|")
    for what, mib, change in memory_rows(samples, rounds):
        cells = " | ".join(f"{v:,.1f}" for v in mib)
        print(f"| {what} | {cells} | {change:+.1f}% |")


def time_per_call(fn: Callable[[], object], min_seconds: float = 0.5) -> tuple[float, float]:
    """Wall and CPU seconds (this process's) per call of `fn`, repeated for at least
    `min_seconds` of wall time. On a loaded machine the CPU time is the cost an idle one
    would see."""
    calls, start, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls, (time.process_time() - cpu) / calls


def traced_bytes(build: Callable[[], T]) -> tuple[T, int]:
    """What `build` returns and the bytes Python allocated for it (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    made = build()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return made, after - before


def dispatch_cost(num_nodes: int, num_messages: int) -> dict[str, float]:
    """One sweep of the simulation engine's dispatcher (`add_messages_to_queue`: every node's
    `get_message_ins(node_id, limit=1)`) over `num_nodes` nodes while `num_messages`
    instructions to distinct nodes, pushed through the ServerApp's grid, are stored (as
    they stay until their replies are pulled): seconds per sweep and per (node x stored
    message)."""
    from flwr.common import Message, RecordDict

    state, grid, mapping = in_memory_engine(num_nodes)
    nodes = list(mapping)
    grid.push_messages([Message(RecordDict(), node_id, "query", group_id="0")
                        for node_id in nodes[:num_messages]])

    def sweep() -> None:
        for node_id in nodes:
            state.get_message_ins(node_id=node_id, limit=1)

    stored = len(state.message_ins_store)
    seconds, cpu = time_per_call(sweep)
    return {"nodes": num_nodes, "stored": stored, "sweep_seconds": seconds,
            "sweep_cpu_seconds": cpu, "per_node_cpu_us": 1e6 * cpu / num_nodes,
            "per_pair_cpu_us": 1e6 * cpu / (num_nodes * max(stored, 1))}


def node_memory(num_nodes: int) -> dict[str, float]:
    """Bytes per virtual client: in Flower's engine (the link state's node records and the
    engine's `DeprecatedRunInfoStore` with its Context, as `start_vce` registers them) and in
    the server's `SeededClientManager` (Flower's `GridClientProxy` registered as the compat
    server registers it, wrapped by `register`, and its cached client key)."""
    from fl_app.server.client_manager import SeededClientManager

    (_, grid, mapping), engine = traced_bytes(lambda: in_memory_engine(num_nodes))
    _, empty_engine = traced_bytes(lambda: in_memory_engine(0))
    _, stores = traced_bytes(lambda: engine_node_stores(mapping, grid.run))
    manager = SeededClientManager(seed=0)

    def register() -> None:
        for node_id in mapping:
            manager.register(grid_client_proxy(node_id, grid, grid.run.run_id))

    _, managed = traced_bytes(register)
    # the client keys `ordered` caches: node id -> partition id, as strings
    _, keys = traced_bytes(lambda: {str(node): str(part) for node, part in mapping.items()})
    return {"nodes": num_nodes, "link_state_bytes": (engine - empty_engine) / num_nodes,
            "run_info_store_bytes": stores / num_nodes,
            "client_manager_bytes": (managed + keys) / num_nodes}


def data_cost(dataset: str, clients: int) -> dict[str, Any]:
    """The data of a `many` run of `clients` clients (`data_keys`), as every process of a
    run builds it (the server for its test set, each Ray worker for its clients'
    partitions): seconds and bytes per client of the dataset's build, the first partition
    load (which also builds the partitioner, if any) and one client's partition load after
    it (partitioning, checks, train/validation split; the mean of up to 200)."""
    from fl_app.app.config import resolve
    from fl_app.data.sources import data_source, load_partition

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)  # the checks warn of every skewed user
    try:
        cfg = resolve({"dataset": dataset, **data_keys(dataset, clients)})
        start = time.perf_counter()
        _, allocated = traced_bytes(lambda: data_source(DataSettings.from_config(cfg)))
        build = time.perf_counter() - start
        start = time.perf_counter()
        load_partition(DataSettings.from_config(cfg), 0, clients)
        first = time.perf_counter() - start
        loads = range(1, min(clients, 201))
        start = time.perf_counter()
        for partition in loads:
            load_partition(DataSettings.from_config(cfg), partition, clients)
        per_load = (time.perf_counter() - start) / len(loads)
    finally:
        flwr_logger.setLevel(level)  # this process's logging as it was
    return {"dataset": dataset, "clients": clients, "build_seconds_per_client": build / clients,
            "bytes_per_client": allocated / clients, "first_load_seconds": first,
            "partition_load_seconds": per_load}


def run_costs(args: argparse.Namespace) -> dict[str, Any]:
    """The per-client costs (`costs`), as a JSON-able dict."""
    return {"dispatch": [dispatch_cost(n, m) for n in args.nodes for m in args.messages],
            "memory": [node_memory(n) for n in args.nodes],
            "data": [data_cost(dataset, n) for dataset in args.datasets for n in args.nodes]}


def print_costs(costs: Mapping[str, Any]) -> None:
    """The `costs` tables."""
    print("\nFlower's dispatcher: one sweep of get_message_ins over every node")
    print("| nodes | stored instructions | sweep s (wall) | sweep s (CPU) | CPU us per node "
          "| CPU us per (node x message) |")
    print("|---|---|---|---|---|---|")
    for row in costs["dispatch"]:
        print(f"| {row['nodes']:,} | {row['stored']} | {row['sweep_seconds']:.3f} | "
              f"{row['sweep_cpu_seconds']:.3f} | {row['per_node_cpu_us']:.1f} | "
              f"{row['per_pair_cpu_us']:.2f} |")
    print("\nMemory per virtual client (bytes, tracemalloc)")
    print("| nodes | link state | engine run-info store | server client manager |")
    print("|---|---|---|---|")
    for row in costs["memory"]:
        print(f"| {row['nodes']:,} | {row['link_state_bytes']:,.0f} | "
              f"{row['run_info_store_bytes']:,.0f} | {row['client_manager_bytes']:,.0f} |")
    print("\nThe data, built in every process (`many`'s data keys)")
    print("| dataset | clients | build us per client | bytes per client | first partition s "
          "| one partition load ms |")
    print("|---|---|---|---|---|---|")
    for row in costs["data"]:
        print(f"| {row['dataset']} | {row['clients']:,} | "
              f"{1e6 * row['build_seconds_per_client']:.0f} | {row['bytes_per_client']:,.0f} | "
              f"{row['first_load_seconds']:.2f} | {1e3 * row['partition_load_seconds']:.2f} |")


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
                      choices=DATASETS)
    many.add_argument("--seed", type=int, default=42)
    many.add_argument("--at", type=int, nargs="+", default=None,
                      help="rounds whose memory is shown (default: 1, 10 and the last)")
    costs = sub.add_parser("costs", help="measure the per-client costs of a larger run")
    costs.add_argument("--nodes", type=int, nargs="+", default=[1000, 10_000])
    costs.add_argument("--messages", type=int, nargs="+", default=[0, 100])
    costs.add_argument("--datasets", nargs="*", default=list(DATASETS), choices=DATASETS)
    for command in (many, costs):
        command.add_argument("--json", type=Path, default=None,
                             help="also write the figures here")
        add_results_option(command)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run the chosen measurement, print its tables and write them into docs/results.md."""
    args = parse_args(argv)
    result = run_many(args) if args.command == "many" else run_costs(args)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    # a section per measurement: `many` per model and dataset, so its runs do not overwrite
    # each other's (aggregation_scale's clients table makes two)
    section = (f"scale-clients-many-{args.model}-{args.dataset}" if args.command == "many"
               else "scale-clients-costs")
    with recorded(section, "scripts.bench.scale_clients", write=not args.no_results):
        if args.command == "many":
            print_many(result, args.at or sorted({1, min(10, args.rounds), args.rounds}))
        else:
            print_costs(result)


if __name__ == "__main__":
    main()
