"""Benchmark: one workload in simulation, in a real deployment, and on the deployment's floor.

    python scripts/benchmark_deployment.py [--rounds 10] [--num-nodes 3]
        [--modes simulation,deployment,floor] [--before REV]

The workload: digits, IID, `--num-nodes` clients, every client in every round, the app's
default local training, `--rounds` rounds. It runs

- `simulation`: `run_simulation.py --num-supernodes N` (Flower's simulation engine);
- `deployment`: `deploy.launch` on 127.0.0.1 — a SuperLink, N SuperNodes, TLS and node
  authentication on, a long-lived worker next to each SuperNode (`fl_app.app.worker`);
- `no-workers`: the same deployment, every ClientApp process training itself (importing
  TensorFlow, loading the data, building the model);
- `floor`: the same deployment with a ClientApp that does no work (it returns the weights
  it gets): the cost of Flower's process-per-message design on this machine, which no app
  can go below;
- `--before REV`: `no-workers` from a checkout of git revision REV (e.g. the commit before
  the workers, `3992b38`), as the deployment ran then.

Per round: the median of rounds 2..N of history.json's `seconds` (round 1 includes the
workers' first model build and is printed apart). Per fit message: the clients' mean
seconds per phase (`fit.timing`: process start, imports, data, model, training; see
`fl_app.client.timing`) over rounds 2..N and in round 1; what a round spends outside the
clients' fit phases is Flower's transport, the evaluate messages and the server's work.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parent.parent
MODES = ("simulation", "deployment", "no-workers", "floor")
PHASES = ("process", "imports", "data", "model", "training")

# The floor's ClientApp: no TensorFlow, no data, no model; the weights it gets go back.
FLOOR_APP = '''"""A ClientApp that does no work (scripts/benchmark_deployment.py's floor)."""

import time

import psutil
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp


class Idle(NumPyClient):
    def __init__(self, started: float) -> None:
        self.started = started

    def fit(self, parameters, config):
        return parameters, 1, {"time_process": self.started - psutil.Process().create_time()}

    def evaluate(self, parameters, config):
        return 0.0, 1, {}


app = ClientApp(client_fn=lambda context: Idle(time.time()).to_client())
'''


def floor_project(folder: Path) -> Path:
    """A copy of this app's tracked files whose ClientApp is `FLOOR_APP`."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True, text=True,
                           stdout=subprocess.PIPE).stdout.split()
    for name in files:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, target)
    (folder / "floor_clientapp.py").write_text(FLOOR_APP, encoding="utf-8")
    pyproject = tomllib.loads((folder / "pyproject.toml").read_text(encoding="utf-8"))
    pyproject["tool"]["flwr"]["app"]["components"]["clientapp"] = "floor_clientapp:app"
    (folder / "pyproject.toml").write_text(tomli_w.dumps(pyproject), encoding="utf-8")
    return folder


def checkout(folder: Path, revision: str) -> Path:
    """A detached git worktree of `revision` in `folder`."""
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(folder), revision],
                   cwd=ROOT, check=True)
    return folder


def run(argv: list[str], cwd: Path, out: Path, what: str) -> tuple[dict[str, Any], float]:
    """Run `argv` in `cwd` (its own code first on the path); its history.json and wall time."""
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=_env(cwd))
    wall = time.perf_counter() - start
    history_path = out / "history.json"
    if done.returncode != 0 or not history_path.is_file():
        raise SystemExit(f"{what} failed (exit code {done.returncode}):\n{done.stdout[-3000:]}")
    return json.loads(history_path.read_text(encoding="utf-8")), wall


def _env(cwd: Path) -> dict[str, str]:
    import os

    return {**os.environ, "PYTHONPATH": str(cwd)}


def launch_argv(folder: Path, rounds: int, num_nodes: int, out: Path, *, workers: bool,
                project: Path | None = None) -> list[str]:
    """`python -m deploy.launch` for one deployment run."""
    argv = [sys.executable, "-m", "deploy.launch", "--dir", str(folder), "--num-nodes",
            str(num_nodes), "--run-config", f"num-server-rounds={rounds}", "--out", str(out),
            "--timeout", "3600"]
    return (argv + ([] if workers else ["--no-workers"])
            + ([] if project is None else ["--project", str(project)]))


def summarize(history: dict[str, Any], wall: float) -> dict[str, Any]:
    """Per-round seconds (round 1 apart, median of the rest) and the mean fit phases."""
    rounds = [r for r in history["rounds"] if r["round"] > 0]
    seconds = [float(r["seconds"]) for r in rounds]
    later = rounds[1:] or rounds

    def phases(records: list[dict[str, Any]]) -> dict[str, float]:
        timings = [r.get("fit", {}).get("timing", {}) for r in records]
        return {p: statistics.mean(t.get(p, 0.0) for t in timings) for p in PHASES
                if any(p in t for t in timings)}

    return {"rounds": len(seconds), "round1": seconds[0],
            "median": statistics.median(seconds[1:] or seconds), "wall": wall,
            "all": seconds, "phases": phases(later), "phases1": phases(rounds[:1])}


def one(mode: str, tmp: Path, rounds: int, num_nodes: int,
        before: str | None) -> dict[str, Any]:
    """Run one mode; its summary."""
    out = tmp / f"out-{mode}"
    dep = tmp / "dep"  # prepared by the first deployment run, reused by the others
    if mode == "simulation":
        argv = [sys.executable, "run_simulation.py", "--num-supernodes", str(num_nodes),
                "--run-config", f"num-server-rounds={rounds}", "--out", str(out)]
        return summarize(*run(argv, ROOT, out, mode))
    if mode == "before":
        tree = checkout(tmp / "before-tree", str(before))
        try:
            # the revision predates workers (and --no-workers): every ClientApp trains itself
            argv = launch_argv(tmp / "dep-before", rounds, num_nodes, out, workers=True)
            return summarize(*run(argv, tree, out, f"{mode} ({before})"))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                           check=False)
    project = floor_project(tmp / "floor-app") if mode == "floor" else None
    argv = launch_argv(dep, rounds, num_nodes, out, workers=mode == "deployment",
                       project=project)
    return summarize(*run(argv, ROOT, out, mode))


def report(mode: str, r: dict[str, Any]) -> None:
    """Print one mode's figures."""
    print(f"{mode:>11}: median of rounds 2..{r['rounds']} {r['median']:6.2f} s/round, "
          f"round 1 {r['round1']:.2f} s, wall {r['wall']:.1f} s; rounds: "
          + " ".join(f"{s:.2f}" for s in r["all"]), flush=True)
    for label, phases in (("rounds 2..N", r["phases"]), ("round 1", r["phases1"])):
        if phases:
            inside = sum(phases.values())
            print(f"{'':>13}fit message, {label}: "
                  + ", ".join(f"{p} {s:.3f}" for p, s in phases.items())
                  + f" (sum {inside:.2f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--num-nodes", type=int, default=3)
    parser.add_argument("--modes", default="simulation,deployment,floor",
                        help=f"comma-separated, of {', '.join(MODES)}")
    parser.add_argument("--before", default=None, metavar="REV",
                        help="also run `no-workers` from git revision REV")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    modes += ["before"] if args.before else []
    results = {}
    with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp:
        for mode in modes:
            results[mode] = one(mode, Path(tmp), args.rounds, args.num_nodes, args.before)
            report(mode, results[mode])
    median = {mode: r["median"] for mode, r in results.items()}
    if "deployment" in median:
        for other, label in (("before", f"before ({args.before}) / deployment"),
                             ("no-workers", "no-workers / deployment"),
                             ("floor", "deployment / floor"), ("simulation",
                                                               "deployment / simulation")):
            if other in median:
                a, b = ((median[other], median["deployment"]) if other in ("before",
                                                                            "no-workers")
                        else (median["deployment"], median[other]))
                print(f"{label}: {a / b:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
