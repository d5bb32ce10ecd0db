"""Benchmark: where `run_simulation.py`'s start-up goes, from the command to the first round's
start (issue 20, item 6), for this tree and (optionally) a baseline tree side by side.

    python -m scripts.bench.scale_startup [--baseline /path/to/other/checkout] [--runs 3]
                                    [--rounds 1] [--num-supernodes 10]
    python -m scripts.bench.scale_startup --baseline DIR --results [--runs 2]

Each run is the real command (`python run_simulation.py --run-config num-server-rounds=1`)
in a child process of its tree (cwd and PYTHONPATH set to it), the trees interleaved run by
run so that the load of a shared machine hits them alike. The child is this file
(`--child`): before it runs `run_simulation.py` it installs a post-import hook that records,
in seconds since the process started (`psutil`'s create time, so the interpreter's own start
is counted), when chosen modules are imported and when chosen functions run:
  * imports: `fl_app.cli.simulate` (the entry's imports: config schema, Flower), `ray`,
    `tensorflow` (Keras and what Keras pulls in), `flwr.simulation`;
  * `ray.init` (Ray's start), `checked_trainer` (the model check: data load and model build);
  * Flower's `run_simulation`, the client warm-up (`SeededClientManager.warm_up`: each
    simulated client's process imports the client, loads its partition and builds its
    model), the round-0 centralized evaluation (its first `tf.function` trace), and the
    round-0 and round-1 records (the first round's start is the round-0 record: what
    history.json's `startup_seconds` measures).
At the round-0 record it also counts the CPU seconds used so far by the run's processes:
this one, Ray's own (GCS, raylet, dashboard, agents, log monitor, autoscaler) and the
client workers. Start-up on a machine with C cores can be no shorter than that total / C.
Phases are reported as start-end (median over the runs so far, printed after each round
of runs); the figures depend on the load, printed before every run (`os.getloadavg`).

`--results` instead runs the full default job (`run_simulation.py`, 20 rounds) `--runs`
times per tree and compares the history.json files, leaving out what is a time (`seconds`,
`timing`, `train_seconds`, `startup_seconds`, `total_seconds`), `out-dir`, and Flower's
random node ids (the keys of `data_quality`, compared as sorted values): every other field
must be equal, and the floats (losses) are shown as their largest relative difference
between every pair of runs, baseline against baseline too: Flower hands a round's replies
to the strategy in no fixed order, and float sums in another order differ in the last bits.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("fl_app.cli.simulate", "ray", "tensorflow", "flwr.simulation")
# (module, attribute path, phase name): functions timed in the child, patched right after
# their module is imported (before anything binds them by name).
FUNCTIONS = (
    ("ray", "init", "ray.init"),
    ("fl_app.app.preflight", "checked_trainer", "model check"),
    ("flwr.simulation", "run_simulation", "flower run_simulation"),
    ("fl_app.server.client_manager", "SeededClientManager.warm_up", "client warm-up"),
    ("fl_app.server.runner", "FederatedServer._evaluate_centralized", "centralized evaluation"),
    ("fl_app.server.recorder", "RunRecorder.on_round", "round record"),
)
TIMES = {"seconds", "timing", "train_seconds", "startup_seconds", "total_seconds", "out-dir"}
RAY_DAEMONS = ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "agent",
               "DashboardAgent", "RuntimeEnvAgent")


# ---------------------------------------------------------------- the child (one run) --

class Marks:
    """Timestamped events of this process, in seconds since it started."""

    def __init__(self) -> None:
        import psutil

        self.origin = psutil.Process().create_time()
        self.events: list[dict[str, Any]] = []
        self.census: dict[str, Any] = {}

    def now(self) -> float:
        """Seconds since this process started."""
        return time.time() - self.origin

    def add(self, name: str, start: float, end: float, **extra: Any) -> None:
        """Record the phase `name` from `start` to `end`."""
        self.events.append({"name": name, "start": start, "end": end, **extra})

    def count_cpu(self) -> None:
        """CPU seconds so far of this process, Ray's daemons and the client workers."""
        import psutil

        this = psutil.Process()
        groups: dict[str, float] = {"driver": sum(this.cpu_times()[:2])}
        workers: list[tuple[float, float]] = []
        for child in this.children(recursive=True):
            try:
                with child.oneshot():
                    name, cmd = child.name(), " ".join(child.cmdline())
                    cpu = sum(child.cpu_times()[:2])
                    started = child.create_time() - self.origin
            except psutil.Error:
                continue
            if name.startswith("ray::") and "Agent" not in name:
                group = "client workers"
                workers.append((started, cpu))
            elif any(daemon in cmd or daemon in name for daemon in RAY_DAEMONS):
                group = "ray daemons"
            else:
                group = "other"
            groups[group] = groups.get(group, 0.0) + cpu
        self.census = {"cpu": groups, "workers": sorted(workers), "at": self.now()}


def timed(marks: Marks, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """`function`, recording each call as phase `name` (round records: at their end, with
    the round number)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = marks.now()
        if name == "round record":
            record = args[1]
            marks.add(f"round {record['round']} recorded", start, start,
                      seconds=float(record["seconds"]))
            if record["round"] == 0:
                marks.count_cpu()
            return function(*args, **kwargs)
        try:
            return function(*args, **kwargs)
        finally:
            marks.add(name, start, marks.now())

    wrapper.__wrapped__ = function  # type: ignore[attr-defined]
    return wrapper


class _Timing(Loader):
    """A loader that times another loader's `exec_module` and patches the module after."""

    def __init__(self, inner: Loader, finder: PostImport) -> None:
        self.inner = inner
        self.finder = finder

    def __getattr__(self, name: str) -> Any:
        """Everything else (resource readers, `get_data`, ...) from the inner loader."""
        return getattr(self.inner, name)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        """The inner loader's module."""
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        """Run the module; record its import and patch its functions."""
        start = self.finder.marks.now()
        self.inner.exec_module(module)
        if module.__name__ in MODULES:
            self.finder.marks.add(f"import {module.__name__}", start, self.finder.marks.now())
        self.finder.patch(module)


class PostImport(MetaPathFinder):
    """Times the imports of `MODULES` and patches `FUNCTIONS` into their modules as they
    are imported."""

    def __init__(self, marks: Marks) -> None:
        self.marks = marks
        self.targets = set(MODULES) | {module for module, _, _ in FUNCTIONS}
        self.busy = False

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        """The spec the other finders give a target module, with a timing loader."""
        if name not in self.targets or self.busy:
            return None
        self.busy = True
        try:
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    spec.loader = _Timing(spec.loader, self)
                    return spec
        finally:
            self.busy = False
        return None

    def patch(self, module: ModuleType) -> None:
        """Wrap the `FUNCTIONS` of `module` with `timed`."""
        for name, attribute, phase in FUNCTIONS:
            if name != module.__name__:
                continue
            owner: Any = module
            *parents, last = attribute.split(".")
            for parent in parents:
                owner = getattr(owner, parent, None)
            if owner is not None and hasattr(owner, last):
                setattr(owner, last, timed(self.marks, phase, getattr(owner, last)))


def child(marks_file: str, argv: list[str]) -> None:
    """Run `run_simulation.py` (of the current directory) with `argv`, timed; write the
    marks to `marks_file`."""
    import runpy

    marks = Marks()
    marks.add("python up", 0.0, marks.now())
    sys.meta_path.insert(0, PostImport(marks))
    sys.argv = ["run_simulation.py", *argv]
    code: object = 0
    try:
        runpy.run_path("run_simulation.py", run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
    Path(marks_file).write_text(json.dumps({"events": marks.events, "census": marks.census,
                                            "exit": code}))


# --------------------------------------------------------------- the parent (tables) --

def run_child(tree: Path, argv: list[str]) -> dict[str, Any]:
    """One timed run of `tree`'s run_simulation.py; its marks, and the load before it."""
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="startup-") as folder:
        marks = Path(folder) / "marks.json"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(marks), "--",
             *argv, "--out", str(Path(folder) / "out")],
            cwd=tree, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not marks.exists():
            raise RuntimeError(f"run in {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        result = json.loads(marks.read_text())
        history = json.loads((Path(folder) / "out" / "history.json").read_text())
    result["load"] = load
    result["startup_seconds"] = history["summary"]["startup_seconds"]
    return result


def first(events: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    """The first event called `name`."""
    return next((e for e in events if e["name"] == name), None)


def event_seconds(run: dict[str, Any], name: str) -> float:
    """The `seconds` of the first event called `name` in `run` (which must have one)."""
    event = first(run["events"], name)
    if event is None:
        raise KeyError(f"no '{name}' event in the run")
    return float(event["seconds"])


PHASES = ("python up", "import fl_app.cli.simulate", "import ray", "import tensorflow",
          "ray.init", "model check", "import flwr.simulation", "flower run_simulation",
          "client warm-up", "centralized evaluation", "round 0 recorded", "round 1 recorded")


def span(run: dict[str, Any], phase: str) -> tuple[float, float] | None:
    """(start, end) of `phase` in `run`: the first occurrence (the round-0 evaluation for
    `centralized evaluation`; Flower's call lasts the run, so only its start)."""
    event = first(run["events"], phase)
    if event is None:
        return None
    if phase == "flower run_simulation":
        return event["start"], event["start"]
    if phase == "round 1 recorded":
        return event["start"] - event["seconds"], event["start"]
    return event["start"], event["end"]


def median_span(runs: list[dict[str, Any]], phase: str) -> str:
    """'start - end' medians of `phase` over `runs` ('-' when it never happened)."""
    spans = [s for s in (span(r, phase) for r in runs) if s is not None]
    if not spans:
        return "-"
    start = statistics.median(s[0] for s in spans)
    end = statistics.median(s[1] for s in spans)
    return f"{end:6.2f}" if end - start < 0.005 else f"{start:6.2f} - {end:6.2f}"


def print_startup(trees: dict[str, Path], runs: dict[str, list[dict[str, Any]]]) -> None:
    """The phase table, the CPU census and the headline figures."""
    names = list(trees)
    width = 26
    print(f"\n{'phase (s since the command)':<30}" + "".join(f"{n:>{width}}" for n in names))
    for phase in PHASES:
        label = {"round 1 recorded": "round 1 (start - end)",
                 "round 0 recorded": "round 0 recorded = start-up"}.get(phase, phase)
        print(f"{label:<30}" + "".join(f"{median_span(runs[n], phase):>{width}}" for n in names))
    print(f"\n{'CPU seconds at round 0':<30}" + "".join(f"{n:>{width}}" for n in names))
    groups = ("driver", "ray daemons", "client workers", "other")
    for group in (*groups, "total"):
        values = []
        for n in names:
            cpus = [r["census"]["cpu"] for r in runs[n] if r["census"]]
            per = [sum(c.values()) if group == "total" else c.get(group, 0.0) for c in cpus]
            values.append(f"{statistics.median(per):6.2f}" if per else "-")
        print(f"{group:<30}" + "".join(f"{v:>{width}}" for v in values))
    cores = os.cpu_count() or 1
    print(f"\n{'headline (median)':<30}" + "".join(f"{n:>{width}}" for n in names))
    rows: list[tuple[str, Callable[[dict[str, Any]], float]]] = [
        ("startup_seconds (history)", lambda r: r["startup_seconds"]),
        ("round 1 seconds", lambda r: event_seconds(r, "round 1 recorded")),
        (f"CPU floor (total / {cores} cores)",
         lambda r: sum(r["census"]["cpu"].values()) / cores),
        ("load average before", lambda r: r["load"]),
    ]
    for label, value in rows:
        print(f"{label:<30}" + "".join(
            f"{statistics.median(value(r) for r in runs[n]):>{width}.2f}" for n in names))
    for n in names:
        print(f"{n}: startup_seconds of each run: "
              + ", ".join(f"{r['startup_seconds']:.2f}" for r in runs[n]))


# ------------------------------------------------------------- results (histories) --

def comparable(value: Any) -> Any:
    """`value` without times, out-dir and Flower's node ids (data_quality's keys)."""
    if isinstance(value, dict):
        return {k: (sorted((comparable(v) for v in value[k].values()), key=json.dumps)
                    if k == "data_quality" else comparable(value[k]))
                for k in value if k not in TIMES}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def differences(a: Any, b: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(path, a, b) for every leaf where `a` and `b` differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            yield from differences(a.get(key), b.get(key), f"{path}/{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from differences(x, y, f"{path}[{i}]")
    elif a != b:
        yield path, a, b


def compare(a: dict[str, Any], b: dict[str, Any]) -> tuple[list[str], float]:
    """The paths of the non-float differences, and the largest relative float difference."""
    other, largest = [], 0.0
    for path, x, y in differences(comparable(a), comparable(b)):
        if isinstance(x, float) and isinstance(y, float):
            largest = max(largest, abs(x - y) / max(abs(x), abs(y), 1e-300))
        else:
            other.append(f"{path}: {x!r} != {y!r}")
    return other, largest


def full_run(tree: Path, folder: Path, name: str) -> dict[str, Any]:
    """The default job (`run_simulation.py --out`) of `tree`; its history."""
    out = folder / name
    env = {**os.environ, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "run_simulation.py", "--out", str(out)],
                          cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run in {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((out / "history.json").read_text())


def print_results(trees: dict[str, Path], runs: int) -> None:
    """Full runs of every tree, interleaved; every pair of histories compared."""
    histories: list[tuple[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="startup-results-") as folder:
        for i in range(runs):
            for name, tree in trees.items():
                print(f"full run {i + 1} of {name} (load {os.getloadavg()[0]:.1f})", flush=True)
                histories.append((f"{name}#{i + 1}", full_run(tree, Path(folder), f"{name}{i}")))
    for (name_a, a), (name_b, b) in itertools.combinations(histories, 2):
        other, largest = compare(a, b)
        verdict = "equal" if not other else f"{len(other)} non-float difference(s)"
        print(f"{name_a:>14} vs {name_b:<14} {verdict}; largest relative float difference "
              f"{largest:.1e}")
        for line in other[:5]:
            print(f"    {line}")
    for name, history in histories:
        accuracy = history["summary"]["metrics"]["centralized"]["accuracy"]["final"]
        print(f"{name}: final centralized accuracy {accuracy:.4f}")


def main() -> None:
    """Parse the options; run the children; print the tables."""
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[4:])
        return
    # here, not at the top: the child runs in the tree it times (a baseline may lack it)
    from scripts.bench.results_page import add_results_option, recorded

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another checkout to run side by side (e.g. main)")
    parser.add_argument("--runs", type=int, default=3, help="runs per tree (default 3)")
    parser.add_argument("--rounds", type=int, default=1, help="server rounds per run")
    parser.add_argument("--num-supernodes", type=int, default=10)
    parser.add_argument("--results", action="store_true",
                        help="compare the full default job's history.json across the trees")
    add_results_option(parser)
    args = parser.parse_args()
    trees = {"this tree": ROOT}
    if args.baseline is not None:
        trees = {"baseline": args.baseline.resolve(), **trees}
    print(f"{os.cpu_count()} CPUs; load average {os.getloadavg()}")
    if args.results:
        print_results(trees, args.runs)
        return
    argv = ["--num-supernodes", str(args.num_supernodes),
            "--run-config", f"num-server-rounds={args.rounds}"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    for i in range(args.runs):
        for name, tree in trees.items():
            result = run_child(tree, argv)
            runs[name].append(result)
            print(f"run {i + 1} {name}: start-up {result['startup_seconds']:.2f} s "
                  f"(load before {result['load']:.1f})", flush=True)
        with recorded("scale-startup", "scripts.bench.scale_startup", text=True,
                      write=not args.no_results):  # after every round of runs: the medians so far
            print_startup(trees, runs)


if __name__ == "__main__":
    main()
