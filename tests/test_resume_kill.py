"""A real crash: SIGKILL the server process after round k, resume, and compare with a run
that was never interrupted (same seed).

With the DP strategies registered the run is `dp-fixed` around FedAdam, so the privacy
accountant, the noise RNG and the server optimizer moments must all survive the crash;
without them, FedAdam alone (moments m_t, v_t). The DP noise is seeded (`dp-noise-seed`)
so that the two runs can be compared loss for loss.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fl_app.server.checkpoint import CheckpointError, load_checkpoint
from strategies.registry import strategy_names

ROOT = Path(__file__).resolve().parent.parent
ROUNDS, KILL_AFTER = 5, 2
DP = "dp-fixed" in strategy_names()
STRATEGY = ("strategy='dp-fixed' dp-inner='fedadam' noise-multiplier=0.3 clipping-norm=2.0 "
            "dp-noise-seed=11" if DP else "strategy='fedadam'")
RUN_CONFIG = (f"num-server-rounds={ROUNDS} local-epochs=1 fraction-evaluate=0 "
              f"min-fit-clients=4 min-available-clients=4 {STRATEGY}")


def _start(args: list[str], log: Path) -> subprocess.Popen:
    """run_simulation.py in its own process group (so the kill takes its Ray workers too)."""
    return subprocess.Popen([sys.executable, "run_simulation.py", "--num-supernodes", "4", *args],
                            cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _checkpoint_round(folder: Path) -> int:
    try:
        return load_checkpoint(folder).round
    except CheckpointError:
        return -1


def _kill_after_round(proc: subprocess.Popen, folder: Path, k: int, limit: float) -> int:
    deadline = time.monotonic() + limit
    while (reached := _checkpoint_round(folder)) < k:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline, f"no checkpoint of round {k} after {limit} s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return reached


def _history(folder: Path) -> dict:
    return json.loads((folder / "history.json").read_text())


def test_sigkill_after_round_k_then_resume_matches_an_uninterrupted_run(tmp_path):
    crashed, reference = tmp_path / "crashed", tmp_path / "reference"
    ref_proc = _start(["--run-config", RUN_CONFIG, "--out", str(reference)],
                      tmp_path / "reference.log")
    proc = _start(["--run-config", RUN_CONFIG, "--out", str(crashed)], tmp_path / "crashed.log")
    killed_at = _kill_after_round(proc, crashed, KILL_AFTER, limit=300)
    assert proc.returncode == -signal.SIGKILL
    assert killed_at < ROUNDS and _history(crashed)["stopped"] is None

    resumed = _start(["--resume", str(crashed)], tmp_path / "resumed.log")
    assert resumed.wait(timeout=400) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert ref_proc.wait(timeout=400) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    history, expected = _history(crashed), _history(reference)
    assert [r["round"] for r in history["rounds"]] == list(range(ROUNDS + 1))
    assert history["stopped"] == "num-server-rounds"
    assert history["resumed_after"] == [killed_at]
    assert load_checkpoint(crashed).round == ROUNDS
    for got, want in zip(history["rounds"], expected["rounds"], strict=True):
        assert math.isclose(got["centralized"]["loss"], want["centralized"]["loss"],
                            rel_tol=1e-3), got["round"]
        if DP and got["round"] > 0:
            assert got["privacy"] == want["privacy"]
    if DP:
        assert history["rounds"][-1]["privacy"]["epsilon"] > 0
