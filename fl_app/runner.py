"""The server loop: Flower's round structure plus stopping rules and per-round records."""

from __future__ import annotations

import random
import timeit
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.common import Code, GetPropertiesIns, Parameters, Scalar
from flwr.common.logger import log
from flwr.server import Server, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion
from flwr.server.history import History
from flwr.server.strategy import Strategy

from fl_app.client_app import CLIENT_KEY
from fl_app.client_failures import NamedClientProxy, describe_failure
from fl_app.config import IDLE_STOP

from strategies.state import set_strategy_state, strategy_state


class SeededClientManager(SimpleClientManager):
    """Flower's client manager with reproducible sampling.

    Node ids are random in every run, so clients are ordered by a stable key each client
    reports once through `get_properties` (`client-key`: its partition or data file),
    and the seeded RNG samples positions in that order. When every client is sampled no
    key is needed and none is asked for.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self._rng = random.Random(seed)
        self._keys: dict[str, str] = {}

    def register(self, client: ClientProxy) -> bool:
        """Register `client` wrapped so that its failures name it (`NamedClientProxy`)."""
        return super().register(NamedClientProxy(client))

    def _ask_key(self, cid: str) -> str:
        fallback = f"~{cid}"  # a client that cannot say sorts after those that can
        try:
            res = self.clients[cid].get_properties(GetPropertiesIns(config={}), timeout=120,
                                                   group_id=0)
        except Exception:  # a broken client keeps its node id as key
            return fallback
        if res.status.code != Code.OK:
            return fallback
        return str(res.properties.get(CLIENT_KEY, fallback))

    def ordered(self, cids: Iterable[str]) -> list[str]:
        """`cids` sorted by their clients' stable keys (asked once per client, in parallel)."""
        cids = list(cids)
        missing = [cid for cid in cids if cid not in self._keys]
        if missing:
            with ThreadPoolExecutor(max_workers=min(32, len(missing))) as pool:
                self._keys.update(zip(missing, pool.map(self._ask_key, missing)))
        return sorted(cids, key=lambda cid: (self._keys[cid], cid))

    def warm_up(self) -> None:
        """Ask every connected client for its key now, which starts its ClientApp (in
        simulation: a worker importing TensorFlow, loading data, building the model), so
        that a round timeout measures the round rather than the start-up."""
        self.ordered(self.all())  # all(): Flower registers newly connected nodes on this call

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Criterion | None = None) -> list[ClientProxy]:
        """Sample `num_clients` clients once at least `min_num_clients` are connected."""
        self.wait_for(num_clients if min_num_clients is None else min_num_clients)
        available = [cid for cid, client in self.clients.items()
                     if criterion is None or criterion.select(client)]
        if num_clients > len(available):
            log(WARNING, "sampling %s clients but only %s are available", num_clients,
                len(available))
            return []
        if num_clients == len(available):
            return [self.clients[cid] for cid in sorted(available)]
        ordered = self.ordered(available)
        return [self.clients[cid] for cid in self._rng.sample(ordered, num_clients)]

    def get_state(self) -> dict[str, Any]:
        """The sampling RNG's state (for checkpoints)."""
        version, internal, gauss_next = self._rng.getstate()
        return {"rng": [version, list(internal), gauss_next]}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore the sampling RNG from `get_state`'s output."""
        version, internal, gauss_next = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss_next))


class StoppingRules:
    """Ends a run early: target accuracy reached, `patience` rounds without improvement, or
    `max_idle_rounds` rounds in a row in which no client update was accepted."""

    def __init__(self, target_accuracy: float, patience: int, max_idle_rounds: int = 0) -> None:
        self.target_accuracy = target_accuracy
        self.patience = patience
        self.max_idle_rounds = max_idle_rounds
        self.best = float("-inf")
        self.rounds_since_best = 0
        self.idle_rounds = 0

    def after_round(self, accuracy: float | None, accepted_updates: int = 1) -> str | None:
        """Record a round's centralized accuracy and how many client updates it accepted;
        return why to stop, or None."""
        self.idle_rounds = 0 if accepted_updates else self.idle_rounds + 1
        if self.max_idle_rounds and self.idle_rounds >= self.max_idle_rounds:
            return IDLE_STOP
        if accuracy is None:
            return None
        if accuracy > self.best:
            self.best, self.rounds_since_best = accuracy, 0
        else:
            self.rounds_since_best += 1
        if self.target_accuracy and accuracy >= self.target_accuracy:
            return "target-accuracy"
        if self.patience and self.rounds_since_best >= self.patience:
            return "patience"
        return None

    def get_state(self) -> dict[str, Any]:
        """Best accuracy so far, rounds since, and idle rounds in a row (for checkpoints)."""
        return {"best": None if self.best == float("-inf") else self.best,
                "rounds_since_best": self.rounds_since_best, "idle_rounds": self.idle_rounds}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore `get_state`'s output."""
        self.best = float("-inf") if state["best"] is None else float(state["best"])
        self.rounds_since_best = int(state["rounds_since_best"])
        self.idle_rounds = int(state.get("idle_rounds", 0))  # absent in older checkpoints


def _section(loss: float | None, metrics: dict[str, Scalar]) -> dict[str, Any]:
    out: dict[str, Any] = {} if loss is None else {"loss": float(loss)}
    out.update(metrics)
    return out


RoundCallback = Callable[[dict[str, Any], Parameters], None]
CheckpointCallback = Callable[[int, Parameters, dict[str, Any]], None]


@dataclass
class ResumePoint:
    """Where a resumed run continues: its last complete round, weights and server state."""

    round: int
    parameters: Parameters
    server_state: dict[str, Any]


class FederatedServer(Server):
    """Flower's `Server` loop with early stopping and a record per round.

    Each round: fit, centralized evaluation, distributed evaluation, then `on_round` gets
    the round's record (schema in DESIGN.md) and the new global parameters. Strategies that
    account privacy expose `privacy_report(server_round)` and `budget_allows(server_round)`;
    the run stops *before* a round the budget does not allow.

    After every round (round 0 included) `on_checkpoint` gets the round, the global
    parameters and the server state (`server_state()`); with `resume` the run restores
    them and continues after that round instead of starting from round 0.
    """

    def __init__(self, *, strategy: Strategy, seed: int, stopping: StoppingRules,
                 on_round: RoundCallback, on_finish: Callable[[str, Parameters], None],
                 on_checkpoint: CheckpointCallback | None = None,
                 resume: ResumePoint | None = None) -> None:
        super().__init__(client_manager=SeededClientManager(seed), strategy=strategy)
        self.stopping = stopping
        self.on_round = on_round
        self.on_finish = on_finish
        self.on_checkpoint = on_checkpoint
        self.resume = resume

    def server_state(self, stopped: str | None) -> dict[str, Any]:
        """Everything besides the weights that the next round depends on."""
        return {"strategy": strategy_state(self.strategy),
                "client_manager": self.client_manager().get_state(),
                "stopping": self.stopping.get_state(), "stopped": stopped}

    def _checkpoint(self, server_round: int, stopped: str | None) -> None:
        if self.on_checkpoint is not None:
            self.on_checkpoint(server_round, self.parameters, self.server_state(stopped))

    def _restore(self, resume: ResumePoint) -> str | None:
        """Load a checkpoint's state; return why the checkpointed run stopped, if it had."""
        self.parameters = resume.parameters
        state = resume.server_state
        set_strategy_state(self.strategy, state["strategy"])
        self.client_manager().set_state(state["client_manager"])
        self.stopping.set_state(state["stopping"])
        log(INFO, "resuming after round %s", resume.round)
        if state["stopped"]:
            log(INFO, "the checkpointed run had already stopped (%s)", state["stopped"])
        return state["stopped"]

    def _privacy(self, server_round: int) -> dict[str, Any] | None:
        report = getattr(self.strategy, "privacy_report", None)
        return report(server_round) if report else None

    def _budget_allows(self, server_round: int) -> bool:
        allows = getattr(self.strategy, "budget_allows", None)
        return allows(server_round) if allows else True

    def _evaluate_centralized(self, server_round: int, history: History) -> dict[str, Any]:
        res = self.strategy.evaluate(server_round, parameters=self.parameters)
        if res is None:
            return {}
        loss, metrics = res
        history.add_loss_centralized(server_round=server_round, loss=loss)
        history.add_metrics_centralized(server_round=server_round, metrics=metrics)
        return _section(loss, metrics)

    def _fit(self, server_round: int, timeout: float | None,
             history: History) -> tuple[dict[str, Any], int]:
        """Run the round's training; return its record and how many client updates made
        it into a new global model (0 when the strategy kept the previous one)."""
        res_fit = self.fit_round(server_round=server_round, timeout=timeout)
        if res_fit is None:
            return {"num_clients": 0, "num_failures": 0, "num_rejected": 0}, 0
        parameters, metrics, (results, failures) = res_fit
        if parameters:
            self.parameters = parameters
        else:
            log(WARNING, "round %s: no aggregate, the global model is unchanged", server_round)
        history.add_metrics_distributed_fit(server_round=server_round, metrics=metrics)
        record = {"num_clients": len(results), "num_failures": len(failures),
                  "num_rejected": 0, **metrics}
        if failures:
            record["failures"] = [describe_failure(f) for f in failures]
            for failure in record["failures"]:
                log(WARNING, "round %s: client %s failed: %s", server_round,
                    failure["client"], failure["error"])
        return record, (record["num_clients"] - record["num_rejected"] if parameters else 0)

    def _evaluate_distributed(self, server_round: int, timeout: float | None,
                              history: History) -> dict[str, Any]:
        res_fed = self.evaluate_round(server_round=server_round, timeout=timeout)
        if res_fed is None:
            return {}
        loss, metrics, _ = res_fed  # loss is None when every report was rejected or failed
        if loss is not None:
            history.add_loss_distributed(server_round=server_round, loss=loss)
        history.add_metrics_distributed(server_round=server_round, metrics=metrics)
        return _section(loss, metrics)

    def _start(self, timeout: float | None, history: History) -> tuple[int, str | None]:
        """Round 0 (or the restored checkpoint): the first round to run and any stop reason."""
        if timeout is not None:
            self.client_manager().warm_up()
        if self.resume is not None:
            return self.resume.round + 1, self._restore(self.resume)
        self.parameters = self._get_initial_parameters(server_round=0, timeout=timeout)
        record: dict[str, Any] = {"round": 0, "seconds": 0.0,
                                  "centralized": self._evaluate_centralized(0, history)}
        self.on_round(record, self.parameters)
        self._checkpoint(0, None)
        return 1, None

    def fit(self, num_rounds: int, timeout: float | None) -> tuple[History, float]:
        """Run rounds until `num_rounds`, a stopping rule or the privacy budget ends the run."""
        history = History()
        start = timeit.default_timer()
        first_round, already_stopped = self._start(timeout, history)
        stopped = already_stopped or "num-server-rounds"
        rounds = range(first_round, num_rounds + 1) if already_stopped is None else range(0)
        for server_round in rounds:
            if not self._budget_allows(server_round):
                stopped = "privacy-budget"
                break
            round_start = timeit.default_timer()
            fit, accepted = self._fit(server_round, timeout, history)
            record = {"round": server_round, "fit": fit,
                      "centralized": self._evaluate_centralized(server_round, history),
                      "distributed": self._evaluate_distributed(server_round, timeout, history)}
            privacy = self._privacy(server_round)
            if privacy:
                record["privacy"] = privacy
            record["seconds"] = timeit.default_timer() - round_start
            self.on_round({k: v for k, v in record.items() if v != {}}, self.parameters)
            reason = self.stopping.after_round(record["centralized"].get("accuracy"), accepted)
            self._checkpoint(server_round, reason)
            if reason:
                stopped = reason
                break
        log(INFO, "run stopped: %s", stopped)
        self.on_finish(stopped, self.parameters)
        return history, timeit.default_timer() - start

