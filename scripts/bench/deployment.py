"""Benchmark: one workload in simulation, in real deployments, and on Flower's floor.

    python -m scripts.bench.deployment [--rounds 10] [--num-nodes 3]
        [--modes simulation,floor,flower,executor,fused]

The workload: digits, IID, `--num-nodes` clients, every client in every round (fit and
distributed evaluation), the app's default local training, `--rounds` rounds. Every
deployment is `deploy.launch` on 127.0.0.1: a SuperLink, N SuperNodes, TLS and node
authentication on. It runs

- `simulation`: `run_simulation.py --num-supernodes N` (Flower's simulation engine);
- `floor`: a ClientApp that does no work (it returns the weights it gets) under Flower's
  own SuperExec (`--clientapps flower`: a fresh `flwr-clientapp` process per message): the
  cost of Flower's process-per-message design on this machine, the reference;
- `flower`: this app under Flower's SuperExec (each message imports TensorFlow, loads the
  data and builds the model);
- `executor`: this app with its executor (`fl_app.worker.executor`: one warm ClientApp process
  per node), a fit and an evaluate message per round (`fuse-evaluate=false`);
- `fused`: the executor with `fuse-evaluate=true` (one message per round): `deploy.launch`'s
  default.

Per round: the median of rounds 2..N of history.json's `seconds` (round 1 includes the
first model build and is printed apart), each mode over the floor, and the last round's
centralized accuracy (the floor trains nothing: its model stays the initial one). For the
executor modes, where a round goes: the executor's own log times every task ("task done in X s
(pull a, run b, push c)": the task's input pulled from the SuperNode, the ClientApp's run
in the warm process, the reply and status pushed); the rest of a round is outside the
node's tasks (the SuperNode's back-off of up to 3 s after an empty pull, the SuperLink's
relay, the server's aggregation and centralized evaluation).
"""

from __future__ import annotations

import argparse
import json
import re
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

from scripts.bench.results_page import add_results_option, recorded

ROOT = Path(__file__).resolve().parents[2]
MODES = ("simulation", "floor", "flower", "executor", "fused")
LAUNCH = {"floor": ("flower", "fuse-evaluate=false"), "flower": ("flower", "fuse-evaluate=false"),
          "executor": ("executor", "fuse-evaluate=false"), "fused": ("executor", "")}
"""mode -> (deploy.launch's --clientapps, extra run config)"""
TASK_LINE = re.compile(r"done in ([\d.]+) s \(pull ([\d.]+), run ([\d.]+), push ([\d.]+)\)")
PHASES = ("process", "imports", "data", "model", "training")

# The floor's ClientApp: no TensorFlow, no data, no model; the weights it gets go back.
FLOOR_APP = '''"""A ClientApp that does no work (scripts/bench/deployment.py's floor)."""

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
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, check=True, text=True,
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


def launch_argv(folder: Path, mode: str, rounds: int, num_nodes: int, out: Path,
                project: Path | None = None) -> list[str]:
    """`python -m deploy.launch` for one deployment run of `mode`."""
    clientapps, run_config = LAUNCH[mode]
    argv = [sys.executable, "-m", "deploy.launch", "--dir", str(folder), "--num-nodes",
            str(num_nodes), "--out", str(out), "--timeout", "3600", "--clientapps", clientapps,
            "--run-config", f"num-server-rounds={rounds} {run_config}".strip()]
    return argv + ([] if project is None else ["--project", str(project)])


def task_phases(log_dir: Path, rounds: int) -> dict[str, float]:
    """The executors' tasks of rounds 2..N from their logs: tasks per node per round and
    the mean seconds of each phase (each node's first tasks, the client-key query and
    round 1, are left out: they start the warm process)."""
    tasks = []
    logs = sorted(log_dir.glob("*-executor.log"))
    for log in logs:
        lines = TASK_LINE.findall(log.read_text(errors="replace"))
        tasks.append([tuple(map(float, line)) for line in lines])
    counts = [len(t) for t in tasks]
    if not counts:  # Flower's SuperExec ran the tasks: no executor log
        return {}
    per_round = (statistics.mean(counts) - 1) / rounds  # less the client-key query
    skip = 1 + round(per_round)  # the query and round 1's tasks
    later = [task for node in tasks for task in node[skip:]]
    if not later:
        return {}
    return {"tasks/round": per_round,
            **{name: statistics.mean(t[i] for t in later)
               for i, name in enumerate(("task", "pull", "run", "push"))}}


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
            "accuracy": rounds[-1].get("centralized", {}).get("accuracy"),
            "median": statistics.median(seconds[1:] or seconds), "wall": wall,
            "all": seconds, "phases": phases(later), "phases1": phases(rounds[:1])}


def one(mode: str, tmp: Path, rounds: int, num_nodes: int) -> dict[str, Any]:
    """Run one mode; its summary."""
    out = tmp / f"out-{mode}"
    dep = tmp / "dep"  # prepared by the first deployment run, reused by the others
    if mode == "simulation":
        argv = [sys.executable, "run_simulation.py", "--num-supernodes", str(num_nodes),
                "--run-config", f"num-server-rounds={rounds}", "--out", str(out)]
        return summarize(*run(argv, ROOT, out, mode))
    project = floor_project(tmp / "floor-app") if mode == "floor" else None
    summary = summarize(*run(launch_argv(dep, mode, rounds, num_nodes, out, project), ROOT,
                             out, mode))
    summary["tasks"] = task_phases(dep / "launch" / "logs", rounds)
    return summary


def _fmt(value: float | None) -> str:
    """A metric to four places, or `n/a` when the run recorded none."""
    return "n/a" if value is None else f"{value:.4f}"


def report(mode: str, r: dict[str, Any]) -> None:
    """Print one mode's figures."""
    print(f"{mode:>11}: median of rounds 2..{r['rounds']} {r['median']:6.2f} s/round, "
          f"round 1 {r['round1']:.2f} s, wall {r['wall']:.1f} s, final centralized "
          f"accuracy {_fmt(r['accuracy'])}; rounds: "
          + " ".join(f"{s:.2f}" for s in r["all"]), flush=True)
    tasks = r.get("tasks")
    if tasks:
        outside = r["median"] - tasks["task"] * tasks["tasks/round"]
        print(f"{'':>13}executor, rounds 2..N: {tasks['tasks/round']:.2f} task(s) per node "
              f"per round, each {tasks['task']:.3f} s (pull {tasks['pull']:.3f}, run "
              f"{tasks['run']:.3f}, push {tasks['push']:.3f}); outside the node's tasks "
              f"{outside:.2f} s/round", flush=True)
    for label, phases in (("rounds 2..N", r["phases"]), ("round 1", r["phases1"])):
        if phases:
            inside = sum(phases.values())
            print(f"{'':>13}fit message, {label}: "
                  + ", ".join(f"{p} {s:.3f}" for p, s in phases.items())
                  + f" (sum {inside:.2f} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the modes one after the other and print their figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--num-nodes", type=int, default=3)
    parser.add_argument("--modes", default="simulation,floor,flower,executor,fused",
                        help=f"comma-separated, of {', '.join(MODES)}")
    add_results_option(parser)
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        parser.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    with recorded("deployment", "scripts.bench.deployment", text=True, write=not args.no_results):
        results = {}
        with tempfile.TemporaryDirectory(prefix="fl-bench-") as tmp:
            for mode in modes:
                results[mode] = one(mode, Path(tmp), args.rounds, args.num_nodes)
                report(mode, results[mode])
        if "floor" in results:
            for mode, r in results.items():
                if mode != "floor":
                    print(f"{mode} / floor: {r['median'] / results['floor']['median']:.2f}x")
        for mode in ("executor", "fused"):
            if mode in results and "flower" in results:
                ratio = results[mode]["median"] / results["flower"]["median"]
                print(f"{mode} / flower: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
