"""The server loop: Flower's round structure plus stopping rules and per-round records."""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.common import FitRes, Parameters, Scalar
from flwr.common.logger import log
from flwr.server import Server
from flwr.server.client_proxy import ClientProxy
from flwr.server.history import History
from flwr.server.strategy import Strategy

from fl_app.data.quality import REASONS
from fl_app.server.client_failures import describe_failure, last_line
from fl_app.server.client_manager import SeededClientManager
from fl_app.server.stopping import StoppingRules
from fl_app.server.wire_bytes import WireMeter
from fl_app.wire import DATA_QUALITY_PREFIX, MAX_DATA_WARNINGS_CHARS, TIMING_PREFIX
from strategies.protocols import PrivacyAccounting, find_layer
from strategies.state import set_strategy_state, strategy_state


def _section(loss: float | None, metrics: dict[str, Scalar]) -> dict[str, Any]:
    out: dict[str, Any] = dict(metrics)
    if loss is not None:
        out["loss"] = float(loss)  # the aggregated loss, never a client metric named "loss"
    return out


def _without_client_reports(metrics: dict[str, Scalar]) -> dict[str, Scalar]:
    """Aggregated fit metrics less the clients' data-quality counts and timings (a weighted
    average of them means nothing; `data_quality` and `timing` hold them)."""
    return {k: v for k, v in metrics.items()
            if not k.startswith((DATA_QUALITY_PREFIX, TIMING_PREFIX))}


def timing(results: list[tuple[ClientProxy, FitRes]]) -> dict[str, float]:
    """The clients' mean seconds per phase of their fit message (their `time_*` fit
    metrics, see `fl_app.client.timing`); only recorded, never trusted."""
    phases: dict[str, list[float]] = {}
    for _, res in results:
        for key, value in res.metrics.items():
            if key.startswith(TIMING_PREFIX) and isinstance(value, (int, float)):
                phases.setdefault(key.removeprefix(TIMING_PREFIX), []).append(float(value))
    return {phase: sum(values) / len(values) for phase, values in phases.items()}


REPORT_COUNTS = {"rows", *(f"dropped_{reason}" for reason in REASONS)}
"""The counts of a data-quality report (`QualityReport.as_metrics`, prefix removed)."""


def _checked_report_value(cid: str, key: str, value: Scalar) -> bool:
    """Whether a client's data-quality value has the key and form `QualityReport.as_metrics`
    gives it (`warnings`: a string of at most `MAX_DATA_WARNINGS_CHARS`; `REPORT_COUNTS`:
    counts); any other is logged by its type and size, never verbatim."""
    if key == "warnings":
        ok = isinstance(value, str) and len(value) <= MAX_DATA_WARNINGS_CHARS
    else:
        ok = key in REPORT_COUNTS and isinstance(value, int) and not isinstance(value, bool) \
            and value >= 0
    if not ok:
        size = f", {len(value)} characters" if isinstance(value, (str, bytes)) else ""
        log(WARNING, "client %s: its data-quality value %r (%s%s) is not of the expected "
            "form; dropped, not recorded", cid, DATA_QUALITY_PREFIX + key,
            type(value).__name__, size)
    return ok


def data_quality(results: list[tuple[ClientProxy, FitRes]],
                 seen: set[str]) -> dict[str, dict[str, Scalar]]:
    """Each client's data-quality report (its `data_*` fit metrics, prefix removed), for
    clients not in `seen`, which it updates. The counts are only recorded, never trusted;
    a value not of the form clients send (see `_checked_report_value`) is dropped."""
    reports = {}
    for proxy, res in results:
        report = {k.removeprefix(DATA_QUALITY_PREFIX): v for k, v in res.metrics.items()
                  if k.startswith(DATA_QUALITY_PREFIX)}
        if report and proxy.cid not in seen:
            seen.add(proxy.cid)
            kept = {key: value for key, value in report.items()
                    if _checked_report_value(proxy.cid, key, value)}
            if kept:
                reports[proxy.cid] = kept
    return reports


RoundCallback = Callable[[dict[str, Any], Parameters], None]
CheckpointCallback = Callable[[int, Parameters, dict[str, Any]], None]
FitRound = Callable[[Server, int], Any]
"""A fit round run another way (SecAgg+, `fl_app.server.secagg`): `(server, round)` to what
Flower's `Server.fit_round` returns."""


@dataclass
class ResumePoint:
    """Where a resumed run continues: its last complete round, weights and server state."""

    round: int
    parameters: Parameters
    server_state: dict[str, Any]
    ledger: dict[str, Any] | None = None  # the privacy ledger, which may be ahead of `round`


class FederatedServer(Server):
    """Flower's `Server` loop with early stopping and a record per round.

    Each round: fit, centralized evaluation, distributed evaluation, then `on_round` gets
    the round's record (`round`, `seconds`, `fit`, `bytes`, `server_cpu_seconds`,
    `centralized`, `distributed`, `privacy`) and the new global parameters. `bytes` holds the training messages'
    parameter bytes, `up` (every client's `FitRes`) and `down` (every sampled client's
    `FitIns`), as serialized (`fl_app.server.wire_bytes`; SecAgg+ rounds: every protocol
    message's records, counted at the Grid). `server_cpu_seconds.fit` is the CPU time of
    the server's process during the fit (configuring, sending, receiving, decoding and
    aggregating, SecAgg+'s unmasking included; waiting for the clients costs none; under
    Flower's simulation engine also the engine's transport of the messages, whose clients
    train in other processes). The fit record holds
    `data_quality`, the data-quality report of each client that reports for the first time
    in this run (by client id: a client's data does not change, so once is enough; a
    resumed run records its clients again) and `timing`, the clients' mean seconds per
    phase. A strategy with a `PrivacyAccounting` layer (strategies.protocols, the DP
    wrappers) adds its privacy report to every record, and the run stops *before* a round
    its budget does not allow (checked before the first round of a resumed run too). Under
    DP the fit record holds neither `data_quality` nor `timing` (per-client values the
    guarantee does not cover), and a round that released a model is never idle for
    `max-idle-rounds`, whatever its clients did (a stop that depended on which clients
    failed would reveal it, un-noised).

    After every round (round 0 included) `on_checkpoint` gets the round, the global
    parameters and the server state (`server_state()`); with `resume` the run restores
    them and continues after that round instead of starting from round 0. Under DP,
    `on_charge` gets the privacy ledger as soon as a round is aggregated, before the round's
    model is evaluated, recorded or checkpointed.

    With `secure_fit` (see `fl_app.server.secagg`), every fit round runs through it instead
    of Flower's plaintext `fit_round`; all else stays the same.
    """

    def __init__(self, *, strategy: Strategy, seed: int, stopping: StoppingRules,
                 on_round: RoundCallback, on_finish: Callable[[str, Parameters], None],
                 on_checkpoint: CheckpointCallback | None = None,
                 on_charge: Callable[[dict[str, Any]], None] | None = None,
                 resume: ResumePoint | None = None, secure_fit: FitRound | None = None) -> None:
        self.wire = WireMeter(strategy)  # counts the round's parameter bytes up and down
        super().__init__(client_manager=SeededClientManager(seed), strategy=self.wire)
        self.privacy = find_layer(strategy, PrivacyAccounting)
        self.stopping = stopping
        self.on_round = on_round
        self.on_finish = on_finish
        self.on_checkpoint = on_checkpoint
        self.on_charge = on_charge
        self.resume = resume
        self.secure_fit = secure_fit
        self._quality_seen: set[str] = set()

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
        if self.privacy is not None and resume.ledger is not None:
            self.privacy.restore_ledger(resume.ledger)
        self.client_manager().set_state(state["client_manager"])
        self.stopping.set_state(state["stopping"])
        log(INFO, "resuming after round %s", resume.round)
        if state["stopped"]:
            log(INFO, "the checkpointed run had already stopped (%s)", state["stopped"])
        return state["stopped"]

    def fit_round(self, server_round: int, timeout: float | None) -> Any:
        """One fit round: through `secure_fit` when set, else Flower's plaintext round."""
        if self.secure_fit is not None:
            return self.secure_fit(self, server_round)
        return super().fit_round(server_round=server_round, timeout=timeout)

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
        it into a new global model (0 when the strategy kept the previous one; under DP 1
        for every released model, see the class doc)."""
        res_fit = self.fit_round(server_round=server_round, timeout=timeout)
        if self.privacy is not None and self.on_charge is not None:
            self.on_charge(self.privacy.ledger())  # before anything of the round is released
        if res_fit is None:
            return {"num_sampled": 0, "num_clients": 0, "num_failures": 0,
                    "num_rejected": 0}, 0
        parameters, metrics, (results, failures) = res_fit
        if parameters:
            self.parameters = parameters
        else:
            log(WARNING, "round %s: no aggregate, the global model is unchanged", server_round)
        metrics = _without_client_reports(metrics)
        history.add_metrics_distributed_fit(server_round=server_round, metrics=metrics)
        # The server's counts come last: no client-reported metric may overwrite them.
        # Sampled = replied (num_clients, rejected ones included) + failed.
        record = {"num_rejected": 0, **metrics, "num_sampled": len(results) + len(failures),
                  "num_clients": len(results), "num_failures": len(failures)}
        if self.privacy is None:  # under DP, per-client reports are not released
            reports = data_quality(results, self._quality_seen)
            if reports:
                record["data_quality"] = reports
            seconds = timing(results)
            if seconds:
                record["timing"] = seconds
        if failures:
            record["failures"] = [describe_failure(f) for f in failures]
            for failure in record["failures"]:
                log(WARNING, "round %s: client %s failed: %s", server_round,
                    failure["client"], last_line(failure["error"]))
        if not parameters:
            return record, 0
        if self.privacy is not None:  # a released DP round is progress, whoever answered
            return record, 1
        return record, record["num_clients"] - record["num_rejected"]

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
        """Round 0 (or the restored checkpoint): the first round to run and any stop reason.
        The clients are started first, so round 1's time is a round's, not the start-up's."""
        self.client_manager().warm_up()
        if self.resume is not None:
            return self.resume.round + 1, self._restore(self.resume)
        if self.privacy is not None and self.on_charge is not None:
            self.on_charge(self.privacy.ledger())  # a new run: no round charged yet
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
            if (self.privacy is not None
                    and not self.privacy.budget_allows(server_round, self.client_manager())):
                stopped = "privacy-budget"
                break
            round_start, cpu_start = timeit.default_timer(), time.process_time()
            fit, accepted = self._fit(server_round, timeout, history)
            fit_cpu = time.process_time() - cpu_start
            record = {"round": server_round, "fit": fit, "bytes": self.wire.take(),
                      "server_cpu_seconds": {"fit": fit_cpu},
                      "centralized": self._evaluate_centralized(server_round, history),
                      "distributed": self._evaluate_distributed(server_round, timeout, history)}
            privacy = self.privacy.privacy_report(server_round) if self.privacy else None
            if privacy:
                record["privacy"] = privacy
            record["seconds"] = timeit.default_timer() - round_start
            self.on_round({k: v for k, v in record.items() if v != {}}, self.parameters)
            reason = self.stopping.after_round(record, accepted)
            self._checkpoint(server_round, reason)
            if reason:
                stopped = reason
                break
        log(INFO, "run stopped: %s", stopped)
        self.on_finish(stopped, self.parameters)
        return history, timeit.default_timer() - start

