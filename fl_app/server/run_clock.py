"""Where a run's clock starts: the command for a process started for the run, else the call.

Light on purpose (no TensorFlow): entry points call `run_start` before anything heavy loads.
"""

from __future__ import annotations

import time

import psutil

_RUNS = {"started": 0}  # runs this process has started


def run_start(command: bool = True) -> float:
    """Where a run's start-up and total time count from (seconds since the epoch): when the
    process started (the interpreter and the imports count) for the first run of a process
    that a command started for it (`command`: `run_simulation.py`, Flower's ServerApp
    process); now for any other run (a call from Python: a test session, a notebook, a
    second run in a long-lived process)."""
    _RUNS["started"] += 1
    first = _RUNS["started"] == 1
    return psutil.Process().create_time() if command and first else time.time()
