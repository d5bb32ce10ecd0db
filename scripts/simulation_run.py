"""One run of `run_simulation.py` inside a benchmark script: its history and wall time."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fl_app.cli import simulate
from fl_app.server.outputs import read_history


def timed_run(overrides: str, num_clients: int, out_dir: Path,
              cpus_per_client: float | None = None) -> tuple[dict[str, Any], float]:
    """Run `run_simulation.py --num-supernodes N --run-config OVERRIDES --out DIR` in this
    process (`fl_app.cli.simulate.main`; with `cpus_per_client`, also
    `--num-cpus-per-client`); return its history.json and wall seconds.
    Raises RuntimeError when the run fails."""
    start = time.perf_counter()
    cpus = ["--num-cpus-per-client", f"{cpus_per_client:g}"] if cpus_per_client else []
    code = simulate.main(["--num-supernodes", str(num_clients), *cpus, "--run-config",
                          overrides, "--out", str(out_dir)])
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"the run {overrides!r} failed with exit status {code}; see the "
                           "log above")
    return read_history(out_dir), seconds
