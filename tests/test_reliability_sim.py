"""Faulty clients on Flower's simulation engine: the run completes and still learns.

The full-size figure (default workload, 20 rounds, 10 clients, 30% raising and 10% NaN)
is printed by `scripts/bench/faults.py`; here a shorter run with a looser bound.
"""

from __future__ import annotations

import json
import math

import pytest

import run_simulation
from fl_app.client.faults import FaultSettings, assign_roles
from tests.conftest import make_config

pytestmark = pytest.mark.slow  # runs Flower simulations or real processes


def _run(tmp_path, run_config: str, num_supernodes: int) -> dict:
    code = run_simulation.main(["--num-supernodes", str(num_supernodes), "--run-config",
                                run_config, "--out", str(tmp_path)])
    assert code == 0
    return json.loads((tmp_path / "history.json").read_text())


def test_run_with_30pct_raising_and_10pct_nan_clients_completes_and_learns(tmp_path, capsys):
    history = _run(tmp_path, "num-server-rounds=4 fault-raise-fraction=0.3 "
                             "fault-nan-fraction=0.1", num_supernodes=10)
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2, 3, 4]
    assert history["stopped"] == "num-server-rounds"
    # the console says it without ambiguity: 10 sampled = 6 ok + 3 failed + 1 rejected
    assert capsys.readouterr().out.count("| 10 sampled: 6 ok, 3 failed, 1 rejected |") == 4
    for record in history["rounds"][1:]:
        fit = record["fit"]
        assert (fit["num_sampled"], fit["num_clients"], fit["num_failures"],
                fit["num_rejected"]) == (10, 7, 3, 1)
        assert all("injected fault" in f["error"] for f in fit["failures"])
        failed = [f["client"] for f in fit["failures"]]  # each failure names its node
        assert all(c.isdigit() for c in failed) and len(set(failed)) == len(failed)
        assert math.isfinite(record["centralized"]["loss"])
    assert history["rounds"][-1]["centralized"]["accuracy"] >= 0.85


def test_a_run_whose_clients_all_fail_stops_after_max_idle_rounds(tmp_path):
    code = run_simulation.main(["--num-supernodes", "3", "--out", str(tmp_path), "--run-config",
                                "num-server-rounds=6 max-idle-rounds=2 fraction-evaluate=0 "
                                "fault-raise-fraction=1.0 local-epochs=1"])
    assert code == 1
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["stopped"] == "no-client-updates"
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2]
    assert all(r["fit"]["num_failures"] == 3 for r in history["rounds"][1:])


def test_round_timeout_gives_up_on_a_hanging_client(tmp_path):
    # The stalled client sleeps a little longer than the round timeout: the round must end
    # at the timeout without its update. (The simulation itself only shuts down once the
    # sleeping client returns, so the stall is kept short.) Clients are started before
    # round 1, so the honest ones make the timeout even when their workers start slowly.
    timeout, stall = 10.0, 20.0
    run_config = (f"num-server-rounds=1 fraction-evaluate=0 round-timeout={timeout} "
                  f"fault-stall-fraction=0.34 fault-stall-seconds={stall} local-epochs=1")
    roles = assign_roles(FaultSettings.from_config(make_config(fault_stall_fraction=0.34)), 3)
    assert list(roles.values()) == ["stall"]
    history = _run(tmp_path, run_config, num_supernodes=3)
    fit = history["rounds"][1]["fit"]
    assert (fit["num_clients"], fit["num_failures"]) == (2, 1)
    assert all("TTL" in failure["error"] and failure["client"].isdigit()
               for failure in fit["failures"])
    assert timeout <= history["rounds"][1]["seconds"] < stall
    assert history["stopped"] == "num-server-rounds"
