"""Benchmark: a real deployment with a long-lived worker per node vs. without.

    python scripts/benchmark_deployment.py [--rounds 10] [--num-nodes 3] [--only workers|no-workers]

The same workload (digits, IID, `--num-nodes` SuperNodes, the app's default local training)
runs twice through `deploy.launch` on 127.0.0.1 (SuperLink, SuperNodes, TLS and node
authentication on): once with a worker next to each SuperNode (`fl_app.app.worker`: the
ClientApp process Flower starts per message forwards to it), once without (every ClientApp
process imports TensorFlow, loads the data and builds the model). Per-round time is the
median of rounds 2..N of history.json's `seconds`; round 1 (the workers' first model build)
and the wall time are printed apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(folder: Path, rounds: int, num_nodes: int, workers: bool, out: Path) -> dict:
    """One run through `python -m deploy.launch` (a separate process: scripts and deploy are
    one layer); its per-round seconds from history.json."""
    argv = [sys.executable, "-m", "deploy.launch", "--dir", str(folder), "--num-nodes",
            str(num_nodes), "--run-config", f"num-server-rounds={rounds}", "--out", str(out),
            "--timeout", "3600", "--quiet"] + ([] if workers else ["--no-workers"])
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    wall = time.perf_counter() - start
    history_path = out / "history.json"
    if done.returncode != 0 or not history_path.is_file():
        raise SystemExit(f"run {'with' if workers else 'without'} workers failed "
                         f"(exit code {done.returncode}):\n{done.stdout[-3000:]}")
    history = json.loads(history_path.read_text(encoding="utf-8"))
    seconds = [float(r["seconds"]) for r in history["rounds"] if r["round"] > 0]
    later = seconds[1:] or seconds
    return {"rounds": len(seconds), "round1": seconds[0], "median": statistics.median(later),
            "wall": wall, "all": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--num-nodes", type=int, default=3)
    parser.add_argument("--only", choices=("workers", "no-workers"), default=None)
    args = parser.parse_args(argv)
    modes = [m for m in ("workers", "no-workers") if args.only in (None, m)]
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp:
        results = {}
        for mode in modes:  # one prepared folder (the first launch prepares it) for both
            results[mode] = one(Path(tmp) / "dep", args.rounds, args.num_nodes,
                                mode == "workers", Path(tmp) / mode)
            r = results[mode]
            print(f"{mode:>10}: {r['rounds']} rounds, round 1 {r['round1']:.2f} s, "
                  f"median of rounds 2..{r['rounds']} {r['median']:.2f} s, "
                  f"wall {r['wall']:.1f} s; per round: "
                  + " ".join(f"{s:.2f}" for s in r["all"]), flush=True)
    if len(results) == 2:
        print(f"speed-up per round: {results['no-workers']['median'] / results['workers']['median']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
