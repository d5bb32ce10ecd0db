"""What the server records and when it stops under DP: Flower's server loop (`FederatedServer`)
with the real DP strategy, real checkpoints and ledger files, and clients that answer (or
fail) in process."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters

from fl_app.server.checkpoint import Checkpointer, load_checkpoint, read_ledger
from fl_app.server.runner import FederatedServer, ResumePoint
from fl_app.server.stopping import IDLE_STOP, StoppingRules
from strategies.compose import compose
from strategies.context import StrategyContext
from tests.conftest import make_config
from tests.flower_objects import AnsweringProxy, FailingProxy, IdleProxy, random_model

CLIENTS = 4
# What a client's fit reports besides its update: data-quality counts and timings.
REPORTS = {"data_rows": 40, "data_dropped_nonfinite": 0, "data_single_class": 1,
           "time_training": 0.25}


class Run:
    """One run of `FederatedServer` over `clients`, its records and why it stopped."""

    def __init__(self, strategy: str, clients: list[IdleProxy], *, folder=None,
                 resume: ResumePoint | None = None, max_idle_rounds: int = 0,
                 connect_after: float = 0.0, **config) -> None:
        self.cfg = make_config(strategy=strategy, min_fit_clients=CLIENTS,
                               min_available_clients=CLIENTS, fraction_evaluate=0.0, **config)
        self.rounds: list[dict] = []
        self.stopped: list[str] = []
        checkpointer = None if folder is None else Checkpointer(
            self.cfg, folder, lambda: {"rounds": self.rounds})
        model = ndarrays_to_parameters(random_model(np.random.default_rng(0)))
        self.server = FederatedServer(
            strategy=compose(StrategyContext(self.cfg, model)), seed=0,
            stopping=StoppingRules(max_idle_rounds=max_idle_rounds),
            on_round=lambda record, p: self.rounds.append(record),
            on_finish=lambda reason, p: self.stopped.append(reason),
            on_checkpoint=checkpointer,
            on_charge=None if checkpointer is None else checkpointer.save_ledger, resume=resume)
        manager = self.server.client_manager()
        if connect_after:  # the nodes connect after the server has started
            threading.Timer(connect_after,
                            lambda: [manager.register(client) for client in clients]).start()
        else:
            for client in clients:
                manager.register(client)

    def fit(self, num_rounds: int) -> Run:
        """Play up to `num_rounds` rounds."""
        self.server.fit(num_rounds=num_rounds, timeout=None)
        return self


def answering(metrics: dict | None = None) -> list[AnsweringProxy]:
    """CLIENTS clients that answer every fit."""
    return [AnsweringProxy(f"c{i}", metrics) for i in range(CLIENTS)]


@pytest.mark.parametrize("strategy", ["dp-fixed", "dp-client-adaptive"])
def test_dp_records_no_per_client_data_quality_or_timing(strategy):
    run = Run(strategy, answering(REPORTS)).fit(2)
    fits = [record["fit"] for record in run.rounds[1:]]
    assert len(fits) == 2
    for fit in fits:
        assert "data_quality" not in fit and "timing" not in fit
        assert not any(key.startswith(("data_", "time_")) for key in fit)
    assert "bytes" in run.rounds[-1]["privacy"]["not_covered"]


def test_without_dp_the_reports_are_recorded():
    run = Run("weighted-fedavg", answering(REPORTS)).fit(1)
    fit = run.rounds[1]["fit"]
    assert fit["data_quality"]["c0"] == {"rows": 40, "dropped_nonfinite": 0,
                                         "warnings": "single class"}
    assert fit["timing"] == {"training": 0.25}


def test_a_released_dp_round_is_never_idle_whatever_its_clients_did():
    failing = [FailingProxy(f"c{i}") for i in range(CLIENTS)]
    run = Run("dp-fixed", failing, max_idle_rounds=1).fit(3)
    assert run.stopped == ["num-server-rounds"]
    assert [r["fit"]["num_failures"] for r in run.rounds[1:]] == [CLIENTS] * 3
    assert all("dp_noise_std" in r["fit"] for r in run.rounds[1:])  # each one released


def test_without_dp_rounds_without_an_update_still_stop_the_run():
    failing = [FailingProxy(f"c{i}") for i in range(CLIENTS)]
    run = Run("weighted-fedavg", failing, max_idle_rounds=1).fit(3)
    assert run.stopped == [IDLE_STOP] and len(run.rounds) == 2


@pytest.mark.parametrize("connect_after", [0.0, 0.5])
def test_a_resumed_run_whose_budget_is_spent_stops_before_playing_a_round(tmp_path,
                                                                          connect_after):
    """Also when no node is connected yet as the resumed server starts (`connect_after`):
    the budget check waits for them rather than letting round 1 start empty."""
    first = Run("dp-fixed", answering(), folder=tmp_path).fit(2)
    assert first.stopped == ["num-server-rounds"]
    spent = first.rounds[-1]["privacy"]["epsilon"]  # the budget: exactly these two rounds

    checkpoint = load_checkpoint(tmp_path)
    resume = ResumePoint(checkpoint.round, ndarrays_to_parameters(checkpoint.weights),
                         checkpoint.server_state, read_ledger(tmp_path))
    clients = answering()
    resumed = Run("dp-fixed", clients, folder=tmp_path, resume=resume, max_epsilon=spent,
                  connect_after=connect_after).fit(4)
    assert resumed.stopped == ["privacy-budget"]
    assert resumed.rounds == []  # no round recorded
    assert sum(client.fits for client in clients) == 0  # nothing sent, nothing released
    assert load_checkpoint(tmp_path).round == 2
