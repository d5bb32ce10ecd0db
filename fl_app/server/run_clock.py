"""Where a run's clock starts: the command for the first run in a process, the call after.

Light on purpose (no TensorFlow): entry points call `run_start` before anything heavy loads.
"""

from __future__ import annotations

import time

import psutil

_RUNS = {"started": 0}  # runs this process has started


def run_start() -> float:
    """Where a run's start-up and total time count from (seconds since the epoch): for the
    first run in this process, when the process started (the command: the interpreter and
    the imports count); for a later one (a test session, a notebook, any long-lived
    process), now."""
    _RUNS["started"] += 1
    return psutil.Process().create_time() if _RUNS["started"] == 1 else time.time()
