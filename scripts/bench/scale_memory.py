"""Benchmark: the server's peak memory over one fit round, whole round vs streamed (issue 20).

    python -m scripts.bench.scale_memory [--clients 10 50 100] [--model cnn-10m] [--workers 4]
                                   [--plot docs/img/memory_per_round.png]

Each configuration runs in a fresh Python process: one round of `FederatedServer` (the
app's server loop) with the registry's default strategy (`ValidatedStrategy(
WeightedFedAvg)` behind `WireMeter`, as every run builds it) over N clients, on a model
in the layer shapes of `scripts/bench/aggregation_scale.py`'s MODEL (cnn-10m: 9,556,554 float32
weights, 36.5 MiB). Each client is a Flower `ClientProxy` whose `fit` makes its reply
when it is asked (the global model plus noise, serialized as Flower serializes it,
claims 50..150 examples): nothing is made before it "arrives", so the process holds
what a server holds, the replies Flower hands over (in a real run each lives in Flower's
message objects, then in its `FitRes`, until the round lets it go). `--workers` threads
ask the clients, as Flower's `Server.max_workers` does.

  * whole round: Flower's `Server.fit_round` (what the app ran before streaming): every
    reply is collected, then `aggregate_fit` reads them all;
  * streamed: `FederatedServer.fit_round`: each reply is checked and folded into the
    running sum as it arrives (in the sample's order, `ValidatedFitStream`), and its
    tensors dropped; the 3 largest claims are held until the examples cap is known;
  * streamed, stream-hold 0: the same with no update held for the cap (every update
    folded at once), which shows what the hold adds.

Peak RSS is the kernel's high-water mark (VmHWM, reset just before the round through
/proc/self/clear_refs; `ru_maxrss` where that is not allowed); the growth is the peak
minus the RSS before the round (the process with its imports and the global model). The
script prints a table, checks that both paths give the same model (the largest absolute
difference of a weight; replies may arrive in any order, so within float32 rounding), and
plots peak growth against the number of clients with the bound the issue sets (2 x the
model + a constant) for reference.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Status,
    parameters_to_ndarrays,
)
from flwr.server import Server
from flwr.server.client_proxy import ClientProxy

from fl_app.app.config import resolve
from fl_app.server.runner import FederatedServer
from fl_app.server.stopping import StoppingRules
from scripts.bench.aggregation_scale import MODELS, vgg_shapes
from scripts.bench.results_page import add_results_option, recorded
from strategies.compose import compose
from strategies.context import StrategyContext
from strategies.decoding import NUMPY_TENSORS, decode, encode, encode_array
from strategies.protocols import find_layer
from strategies.validated import STREAM_HOLD, ValidatedStrategy
from tests.flower_objects import IdleProxy

ROOT = Path(__file__).resolve().parents[2]

MIB = 2**20
PATHS = {"whole round": None, "streamed": STREAM_HOLD, "streamed, stream-hold 0": 0}
"""Each path and the `stream_hold` of its `ValidatedStrategy` (None: Flower's round)."""


def rss_mib() -> float:
    """The process's resident set size now (MiB)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize() / MIB


def reset_peak() -> bool:
    """Reset the kernel's peak RSS of this process (False where that is not allowed)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_mib(was_reset: bool) -> float:
    """The peak RSS (MiB) since `reset_peak`, or since the process started."""
    if was_reset:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ArrivingClient(IdleProxy):
    """A client that makes its reply only when asked: the model it was sent plus noise."""

    def __init__(self, cid: str, seed: int, lock: threading.Lock) -> None:
        super().__init__(cid)
        self.seed, self.lock = seed, lock

    def fit(self, ins: FitIns, timeout: float | None, group_id: int | None) -> FitRes:
        """The reply, serialized as Flower serializes it, one layer at a time (so making
        it holds little besides the reply; one client at a time)."""
        rng = np.random.default_rng(self.seed)
        with self.lock:
            tensors = [encode_array(g + rng.standard_normal(g.shape, dtype=np.float32)
                                    * np.float32(0.01)) for g in decode(ins.parameters)]
        return FitRes(Status(Code.OK, ""), Parameters(tensors, NUMPY_TENSORS),
                      int(rng.integers(50, 151)), {})


def one_round(path: str, clients: int, model: str, workers: int, seed: int) -> dict:
    """One round on `path` in this process: its figures (MiB, seconds) and a fingerprint
    of the model it made."""
    rng = np.random.default_rng(seed)
    global_model: NDArrays = [rng.normal(0.0, 0.05, shape).astype(np.float32)
                              for shape in vgg_shapes(*MODELS[model])]
    parameters: Parameters = encode(global_model)
    cfg = resolve({"min-fit-clients": clients, "min-available-clients": clients})
    server = FederatedServer(strategy=compose(StrategyContext(cfg, parameters)),
                             seed=seed, stopping=StoppingRules(),
                             on_round=lambda record, p: None, on_finish=lambda reason, p: None)
    server.set_max_workers(workers)
    hold = PATHS[path]
    validated = find_layer(server.strategy, ValidatedStrategy)
    if hold is not None and validated is not None:
        validated.stream_hold = hold
    lock = threading.Lock()
    proxies: list[ClientProxy] = [ArrivingClient(f"c{i}", seed + 1 + i, lock)
                                  for i in range(clients)]
    for proxy in proxies:
        server.client_manager().register(proxy)
    server.strategy.initialize_parameters(server.client_manager())
    server.parameters = parameters
    del proxies
    before = rss_mib()
    was_reset = reset_peak()
    start = time.perf_counter()
    run = Server.fit_round if hold is None else FederatedServer.fit_round
    outcome = run(server, 1, None)
    if outcome is None:
        raise RuntimeError(f"the round on path {path!r} was not run")
    new, metrics, (results, failures) = outcome
    seconds = time.perf_counter() - start
    peak = peak_mib(was_reset)
    if new is None:
        raise RuntimeError(f"the round on path {path!r} made no model")
    arrays = parameters_to_ndarrays(new)
    return {"path": path, "clients": clients, "model": model,
            "weights": int(sum(a.size for a in global_model)),
            "model_mib": sum(a.nbytes for a in global_model) / MIB,
            "rss_before_mib": before, "peak_mib": peak, "growth_mib": peak - before,
            "seconds": seconds, "results": len(results), "failures": len(failures),
            "num_rejected": metrics.get("num_rejected"), "hwm_reset": was_reset,
            "first_weights": [float(x) for x in arrays[0].reshape(-1)[:1000]]}


def measure(path: str, clients: int, model: str, workers: int, seed: int) -> dict:
    """`one_round` in a fresh Python process (its figures)."""
    out = subprocess.run([sys.executable, "-m", "scripts.bench.scale_memory", "--one", path,
                          "--clients", str(clients), "--model", model,
                          "--workers", str(workers), "--seed", str(seed)],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    """Peak RSS growth against clients, one line per path, with 2 x the model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, marker in zip(PATHS, "os^"):
        points = sorted((r["clients"], r["growth_mib"]) for r in rows if r["path"] == name)
        ax.plot(*zip(*points), marker=marker, label=name)
    model_mib, clients = rows[0]["model_mib"], sorted({r["clients"] for r in rows})
    ax.plot(clients, [2 * model_mib] * len(clients), "k--", linewidth=1,
            label=f"2 x model ({2 * model_mib:.0f} MiB)")
    ax.set_xlabel("clients in the round")
    ax.set_ylabel("peak RSS growth over one round (MiB)")
    ax.set_title(f"Server memory per round, {rows[0]['model']} "
                 f"({rows[0]['weights']:,} float32 weights)")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--model", default="cnn-10m", choices=list(MODELS))
    parser.add_argument("--workers", type=int, default=4,
                        help="threads asking the clients (Flower's Server.max_workers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=ROOT / "docs/img/memory_per_round.png",
                        help="where to write the plot (PNG)")
    add_results_option(parser)
    parser.add_argument("--one", choices=list(PATHS), help=argparse.SUPPRESS)  # the child's run
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Measure every configuration, print the table, check the models agree, plot."""
    args = parse_args(argv)
    if args.one:
        print(json.dumps(one_round(args.one, args.clients[0], args.model, args.workers,
                                   args.seed)))
        return
    rows = [measure(path, n, args.model, args.workers, args.seed)
            for n in args.clients for path in PATHS]
    first = rows[0]
    with recorded("scale-memory", "scripts.bench.scale_memory", write=not args.no_results):
        print(f"\nPeak server RSS over one fit round, {first['model']} ({first['weights']:,} "
              f"float32 weights, {first['model_mib']:.1f} MiB), {args.workers} worker threads, "
              "each configuration in a fresh process")
        print("| clients | path | RSS before (MiB) | peak (MiB) | growth (MiB) | growth / model "
              "| round (s) |\n|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['clients']} | {r['path']} | {r['rss_before_mib']:.0f} | "
                  f"{r['peak_mib']:.0f} | {r['growth_mib']:.0f} | "
                  f"{r['growth_mib'] / r['model_mib']:.1f} | {r['seconds']:.1f} |")
    for n in args.clients:
        whole, *streamed = (next(r for r in rows if r["clients"] == n and r["path"] == p)
                            for p in PATHS)
        diff = max(float(np.max(np.abs(np.subtract(whole["first_weights"],
                                                    other["first_weights"]))))
                   for other in streamed)
        print(f"{n} clients: streamed vs whole-round model, max |diff| of the first 1,000 "
              f"weights {diff:.2g}")
    if not all(r["hwm_reset"] for r in rows):
        print("(peak RSS could not be reset before the round: ru_maxrss since start)")
    plot(rows, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
