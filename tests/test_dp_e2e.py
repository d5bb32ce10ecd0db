"""DP runs end to end on Flower's simulation engine through run_simulation.py."""

from __future__ import annotations

import json

import pytest
from dp_accounting import (
    GaussianDpEvent,
    NeighboringRelation,
    SampledWithoutReplacementDpEvent,
)
from dp_accounting.rdp import RdpAccountant

import run_simulation

pytestmark = pytest.mark.slow  # runs Flower simulations or real processes

CLIENTS = 4
FAST = (f"num-server-rounds={{rounds}} local-epochs=1 min-fit-clients={CLIENTS} "
        f"min-available-clients={CLIENTS} fraction-evaluate=0")


def _run(tmp_path, run_config: str) -> dict:
    code = run_simulation.main(["--num-supernodes", str(CLIENTS), "--run-config", run_config,
                                "--out", str(tmp_path)])
    assert code == 0
    return json.loads((tmp_path / "history.json").read_text())


def _rdp_epsilons(noise: float, rounds: int) -> list[float]:
    """ε after 1..rounds rounds of all CLIENTS of CLIENTS sampled, computed independently."""
    out = []
    for t in range(1, rounds + 1):
        accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
        accountant.compose(SampledWithoutReplacementDpEvent(
            CLIENTS, CLIENTS, GaussianDpEvent(noise / 2)), t)
        out.append(accountant.get_epsilon(1e-5))
    return out


def test_dp_run_records_privacy_per_round(tmp_path):
    history = _run(tmp_path, FAST.format(rounds=3) +
                   " strategy='dp-fixed' noise-multiplier=1.0 clipping-norm=0.5")
    assert history["stopped"] == "num-server-rounds"
    rounds = history["rounds"][1:]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    epsilons = [r["privacy"]["epsilon"] for r in rounds]
    assert epsilons == pytest.approx(_rdp_epsilons(1.0, 3), rel=1e-6)
    assert all(r["privacy"]["delta"] == 1e-5 for r in rounds)
    assert all(r["fit"]["dp_clip_norm"] == 0.5 for r in rounds)
    assert (tmp_path / "privacy.png").is_file()
    # The clients' per-client reports (rows, class warnings, timings) are not released.
    assert not any("data_quality" in r["fit"] or "timing" in r["fit"] for r in rounds)
    assert "bytes" in rounds[-1]["privacy"]["not_covered"]
    assert "timing" not in (tmp_path / "history.csv").read_text().splitlines()[0]


def test_client_side_adaptive_run_stops_before_exceeding_the_budget(tmp_path):
    eps = _rdp_epsilons(2.0, 3)
    budget = (eps[1] + eps[2]) / 2  # room for two rounds, not three
    history = _run(tmp_path, FAST.format(rounds=6) +
                   f" strategy='dp-client-adaptive' noise-multiplier=2.0 max-epsilon={budget}")
    assert history["stopped"] == "privacy-budget"
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2]
    assert history["rounds"][-1]["privacy"]["epsilon"] == pytest.approx(eps[1], rel=1e-6)
    assert history["rounds"][-1]["privacy"]["epsilon"] <= budget
    clip_norms = [r["fit"]["dp_clip_norm"] for r in history["rounds"][1:]]
    assert clip_norms[0] == 1.0 and clip_norms[1] != 1.0  # adapted from clients' norm bits

    # A larger budget on resume buys exactly one more round; the accountant carries on.
    larger = (eps[2] + _rdp_epsilons(2.0, 4)[3]) / 2
    assert run_simulation.main(["--num-supernodes", str(CLIENTS), "--resume", str(tmp_path),
                                "--run-config", f"max-epsilon={larger}"]) == 0
    resumed = json.loads((tmp_path / "history.json").read_text())
    assert resumed["stopped"] == "privacy-budget"
    assert [r["round"] for r in resumed["rounds"]] == [0, 1, 2, 3]
    assert resumed["rounds"][-1]["privacy"]["epsilon"] == pytest.approx(eps[2], rel=1e-6)
