"""FedBuff on Flower's simulation engine: a run with a straggler completes, records every
version's staleness, and resumes from its checkpoint."""

from __future__ import annotations

import json

import pytest

from fl_app.cli import simulate

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
NODES = ["--num-supernodes", "4", "--num-cpus-per-client", "0.5"]
CONFIG = ("server-loop='fedbuff' local-epochs=1 fedbuff-buffer-size=2 fraction-evaluate=0 "
          "slow-client-fraction=0.25 slow-client-slowdown=4 min-available-clients=4")


def _history(folder) -> dict:
    return json.loads((folder / "history.json").read_text(encoding="utf-8"))


def test_fedbuff_with_a_straggler_completes_records_staleness_and_resumes(tmp_path):
    out = tmp_path / "run"
    assert simulate.main([*NODES, "--run-config", f"{CONFIG} num-server-rounds=6",
                          "--out", str(out)]) == 0
    history = _history(out)
    rounds = history["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4, 5, 6]
    assert history["stopped"] == "num-server-rounds"
    for record in rounds[1:]:
        fit = record["fit"]
        assert fit["num_clients"] == 2 and fit["num_failures"] == 0, fit
        assert fit["num_sampled"] == 2 + fit["num_rejected"], fit  # rejected arrivals count
        assert 0 <= fit["staleness_mean"] <= fit["staleness_max"] <= 20
        assert record["seconds"] > 0
    # four clients start on version 0 and two updates make each version: the later
    # arrivals were trained on an older version (six versions, not three: two clients that
    # are warm first make a version in ~0.06 s, so a third client's first update, slowed by
    # its TensorFlow start-up under load, could miss three versions entirely)
    assert max(r["fit"]["staleness_max"] for r in rounds[1:]) >= 1
    assert rounds[-1]["centralized"]["accuracy"] > rounds[0]["centralized"]["accuracy"] + 0.2

    assert simulate.main([*NODES, "--resume", str(out),
                          "--run-config", "num-server-rounds=8"]) == 0
    resumed = _history(out)
    assert resumed["resumed_after"] == [6]
    assert [r["round"] for r in resumed["rounds"]] == list(range(9))
    assert resumed["rounds"][:7] == rounds
    assert resumed["stopped"] == "num-server-rounds"
