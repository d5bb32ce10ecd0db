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

import pytest
from dp_accounting import (
    GaussianDpEvent,
    NeighboringRelation,
    SampledWithoutReplacementDpEvent,
)
from dp_accounting.rdp import RdpAccountant

from fl_app.server.checkpoint import CheckpointError, load_checkpoint, read_ledger
from strategies.registry import strategy_names

pytestmark = pytest.mark.slow  # runs Flower simulations or real processes

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


def _ledger_rounds(folder: Path) -> int:
    try:
        ledger = read_ledger(folder)
    except CheckpointError:  # caught mid-write by a reader outside the atomic rename
        return 0
    return 0 if ledger is None else len(ledger["rounds"])


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
    charged_ahead = _ledger_rounds(crashed) - killed_at  # rounds charged, not checkpointed
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
        if DP and 0 < got["round"] and (got["round"] <= killed_at or not charged_ahead):
            assert got["privacy"] == want["privacy"]
        elif DP and got["round"] > 0:  # a round charged before the crash stays charged
            assert got["privacy"]["epsilon"] > want["privacy"]["epsilon"]
    if DP:
        assert history["rounds"][-1]["privacy"]["epsilon"] > 0


def _stop_between_charge_and_checkpoint(proc: subprocess.Popen, folder: Path,
                                        limit: float) -> tuple[int, int]:
    """SIGKILL the run while a round is charged (ledger) but not yet checkpointed: the
    window in which its model reaches the evaluation clients and history.json. The run is
    frozen (SIGSTOP) to look at both files at one instant; if the window has passed, it is
    thawed and the next round is tried. Returns (rounds charged, checkpoint round)."""
    deadline = time.monotonic() + limit
    while True:
        assert proc.poll() is None, "the run ended before it could be killed in the window"
        assert time.monotonic() < deadline, f"no kill between charge and checkpoint in {limit} s"
        if _ledger_rounds(folder) > max(_checkpoint_round(folder), 0):
            os.killpg(proc.pid, signal.SIGSTOP)
            charged, checkpointed = _ledger_rounds(folder), _checkpoint_round(folder)
            if charged > checkpointed:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return charged, checkpointed
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.002)


UNSEEDED_DP = (f"num-server-rounds={ROUNDS} local-epochs=1 dp-distributed-evaluation=true "
               "min-fit-clients=4 min-available-clients=4 strategy='dp-fixed' "
               "noise-multiplier=0.5 clipping-norm=1.0")


def _epsilon(rounds: int, noise: float = 0.5, clients: int = 4) -> float:
    """ε of `rounds` releases of all 4 of 4 clients at δ = 1e-5, computed independently."""
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    accountant.compose(SampledWithoutReplacementDpEvent(
        clients, clients, GaussianDpEvent(noise / 2)), rounds)
    return accountant.get_epsilon(1e-5)


def test_a_kill_between_release_and_checkpoint_keeps_the_round_charged(tmp_path):
    """Round t is charged and its model released (evaluation clients, history.json), then
    the server dies before checkpoint(t). The resume replays round t with fresh noise and
    must charge it again: the run's final ε is that of ROUNDS + 1 releases."""
    crashed = tmp_path / "crashed"
    proc = _start(["--run-config", UNSEEDED_DP, "--out", str(crashed)], tmp_path / "run.log")
    charged, checkpointed = _stop_between_charge_and_checkpoint(proc, crashed, limit=300)
    assert charged == checkpointed + 1 and charged < ROUNDS

    resumed = _start(["--resume", str(crashed)], tmp_path / "resumed.log")
    assert resumed.wait(timeout=400) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    history = _history(crashed)
    assert history["resumed_after"] == [checkpointed]
    assert _ledger_rounds(crashed) == ROUNDS + 1
    final = history["rounds"][-1]["privacy"]["epsilon"]
    assert math.isclose(final, _epsilon(ROUNDS + 1), rel_tol=1e-6)
    assert final > _epsilon(ROUNDS) * (1 + 1e-3)
    assert "charged after the last checkpoint" in (tmp_path / "resumed.log").read_text()
