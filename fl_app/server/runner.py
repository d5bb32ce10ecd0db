"""The server loop: Flower's round structure plus stopping rules and per-round records."""

from __future__ import annotations

import threading
import time
import timeit
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, cast

import numpy as np
from flwr.common import (
    Code,
    EvaluateRes,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    Status,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server import History, Server
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fl_app.data.quality import FINDINGS, REASONS, warning_text
from fl_app.flower_internals import FitResultsAndFailures, fit_client, fit_clients
from fl_app.server.client_failures import describe_failure, last_line
from fl_app.server.client_manager import SeededClientManager
from fl_app.server.round_record import evaluation_section, fit_section, mean_timing
from fl_app.server.statistics import STATISTICS_CONFIG, StatisticsRound
from fl_app.server.stopping import StoppingRules, resolve_mode
from fl_app.wire import (
    DATA_QUALITY_PREFIX,
    FUSED_COUNT,
    FUSED_LOSS,
    FUSED_PREFIX,
    TIMING_PREFIX,
)
from strategies.decoding import without_tensors
from strategies.metrics import is_finite_number
from strategies.protocols import FitStream, StreamsFit, privacy_layer
from strategies.state import set_strategy_state, strategy_state
from strategies.wire_meter import metered


def _without_client_reports(metrics: dict[str, Scalar]) -> dict[str, Scalar]:
    """Aggregated fit metrics less the clients' data-quality counts and timings (a weighted
    average of them means nothing; `data_quality` and `timing` hold them) and their fused
    evaluations (the `distributed` record holds those)."""
    return {k: v for k, v in metrics.items()
            if not k.startswith((DATA_QUALITY_PREFIX, TIMING_PREFIX, FUSED_PREFIX))}


def _decoded_or_none(parameters: Parameters) -> NDArrays:
    """A reply's arrays, or none when its bytes do not decode (a lying client's reply is
    then dropped by the check it fails, not a crash of the server)."""
    try:
        return parameters_to_ndarrays(parameters)
    except Exception:  # noqa: BLE001  (np.load raises many kinds on bad bytes)
        return []


def _sound_report(loss: object, count: object) -> tuple[float, int] | None:
    """A client's evaluation report as (loss, count) when it can be used as it is: a finite
    loss and an example count that is an int >= 0; else None (a client's values never reach
    the aggregation, or crash the server, unchecked)."""
    if is_finite_number(loss) and type(count) is int and count >= 0:
        return float(loss), count
    return None


def _fused_report(cid: str, metrics: dict[str, Scalar]) -> EvaluateRes | None:
    """A fit reply's fused evaluation as an `EvaluateRes`, or None when it has none or its
    loss is not a finite number or its count not a non-negative int (logged: a client's
    values never reach the aggregation, or crash the server, unchecked)."""
    loss, count = metrics.get(FUSED_LOSS), metrics.get(FUSED_COUNT)
    if loss is None and count is None:
        return None
    sound = _sound_report(loss, count)
    if sound is None:
        log(WARNING, "client %s: its fused evaluation (%s=%r, %s=%r) is not a finite loss "
            "and an example count; dropped", cid, FUSED_LOSS, loss, FUSED_COUNT, count)
        return None
    return EvaluateRes(Status(Code.OK, ""), *sound,
                       {key.removeprefix(FUSED_PREFIX): value for key, value in metrics.items()
                        if key.startswith(FUSED_PREFIX) and key not in (FUSED_LOSS, FUSED_COUNT)})


def fused_evaluations(
        results: list[tuple[ClientProxy, FitRes]]) -> list[tuple[ClientProxy, EvaluateRes]]:
    """The evaluations the fit replies carry (`fuse-evaluate`: `eval_loss`,
    `eval_num_examples`, `eval_<metric>`, see `KerasClient`) as the `EvaluateRes` a
    separate evaluate message would have given (see `_fused_report`); the strategy's
    `aggregate_evaluate` then checks them as any evaluation report."""
    reports = [(proxy, _fused_report(proxy.cid, res.metrics)) for proxy, res in results]
    return [(proxy, report) for proxy, report in reports if report is not None]


REPORT_COUNTS = {"rows", *(f"dropped_{reason}" for reason in REASONS), *FINDINGS}
"""The numbers of a data-quality report (`QualityReport.as_metrics`, prefix removed)."""


def _checked_report_value(cid: str, key: str, value: Scalar) -> bool:
    """Whether a client's data-quality value has a key `QualityReport.as_metrics` sends and
    is a count (an int >= 0); any other is logged by its type and size, never verbatim."""
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
            if kept:  # any warning's text from its numbers, as the client logged it
                warnings = "; ".join(warning_text(kept))
                reports[proxy.cid] = {**{k: v for k, v in kept.items() if k not in FINDINGS},
                                      **({"warnings": warnings} if warnings else {})}
    return reports


class StreamFailed(RuntimeError):
    """The server's stream failed on a reply: a server error, raised from the round, never
    recorded as the client's failure."""


def fit_clients_streamed(instructions: list[tuple[ClientProxy, FitIns]],
                         max_workers: int | None, timeout: float | None, group_id: int,
                         stream: FitStream) -> FitResultsAndFailures:
    """Flower's `fit_clients`, each successful reply added to `stream` as it arrives (one
    at a time) and kept without its tensors, each failed client `skip`ped: the round's
    results (proxy, `FitRes` with empty `parameters`) and failures, as Flower sorts them
    (an exception, or a reply whose status is not OK).

    Raises StreamFailed (after every client has answered) if `stream.add` raised.
    """
    lock = threading.Lock()

    def fit_and_add(proxy: ClientProxy, ins: FitIns) -> tuple[ClientProxy, FitRes]:
        try:
            proxy, res = fit_client(proxy, ins, timeout, group_id)
        except BaseException:
            with lock:
                stream.skip(proxy)
            raise
        if res.status.code != Code.OK:
            with lock:
                stream.skip(proxy)
            return proxy, res
        with lock:
            try:
                stream.add(proxy, res)
            except Exception as err:
                raise StreamFailed(f"the round's stream failed on the reply of client "
                                   f"{proxy.cid}: {err!r}") from err
        return proxy, without_tensors(res)

    results: list[tuple[ClientProxy, FitRes]] = []
    failures: list[tuple[ClientProxy, FitRes] | BaseException] = []
    with ThreadPoolExecutor(max_workers=max_workers) as executor:
        futures = [executor.submit(fit_and_add, proxy, ins) for proxy, ins in instructions]
    for future in futures:
        failure = future.exception()
        if isinstance(failure, StreamFailed):
            raise failure
        if failure is not None:
            failures.append(failure)
        else:
            reply = future.result()
            (results if reply[1].status.code == Code.OK else failures).append(reply)
    return results, failures


EVALUATIONS = "client_evaluations"  # round record: each client's distributed evaluation
FAIRNESS = "fairness"  # round record: the spread of those evaluations across clients
RESERVED_REPORT = ("loss", "num_examples")  # a client's metrics cannot overwrite these


def client_evaluations(
        results: list[tuple[ClientProxy, EvaluateRes]]) -> dict[str, dict[str, float]]:
    """Each client's distributed evaluation by client id: its loss, example count and
    every finite numeric metric (only recorded, never trusted); a report whose loss is not
    finite or whose count is not an int >= 0 is left out."""
    evaluations: dict[str, dict[str, float]] = {}
    for proxy, res in results:
        sound = _sound_report(res.loss, res.num_examples)
        if sound is not None:
            evaluations[proxy.cid] = {
                "loss": sound[0], "num_examples": sound[1],
                **{name: float(value) for name, value in res.metrics.items()
                   if is_finite_number(value) and name not in RESERVED_REPORT}}
    return evaluations


def fairness(evaluations: Mapping[str, Mapping[str, float]],
             directions: Mapping[str, str] | None = None) -> dict[str, dict[str, float]]:
    """How each evaluated value (loss, accuracy, ...) spreads over the clients, as the
    q-FFL paper reports it: `mean` across clients (each client counts once), the mean of the
    `worst_10` and `best_10` per cent of clients (10% rounded up, at least one; worse is
    higher for a loss, lower for an accuracy: `resolve_mode` with the metrics'
    `directions`) and the population `variance` across clients."""
    names = dict.fromkeys(name for report in evaluations.values() for name in report
                          if name != "num_examples")
    summary = {}
    for name in names:
        values = np.sort([report[name] for report in evaluations.values() if name in report])
        tail = max(1, (len(values) + 9) // 10)
        low, high = float(values[:tail].mean()), float(values[-tail:].mean())
        worst, best = (low, high) if resolve_mode(name, "auto", directions) == "max" \
            else (high, low)
        summary[name] = {"mean": float(values.mean()), "worst_10": worst, "best_10": best,
                         "variance": float(values.var())}
    return summary


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
    `centralized`, `distributed`, `privacy`) and the new global parameters. `bytes` holds the
    training messages' parameter bytes, `up` (every client's `FitRes`) and `down` (every sampled
    client's `FitIns`), as serialized (`fl_app.server.wire_bytes`; SecAgg+ rounds: every protocol
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
    of Flower's plaintext `fit_round`; all else stays the same. A plaintext round whose
    strategy opens a `FitStream` (`strategies.protocols.StreamsFit`: averaging and central
    DP behind `ValidatedStrategy`) adds each reply to it as it arrives and keeps the reply
    without its tensors, so the server's memory does not grow with the clients; the round's
    results, failures, record and model are those of Flower's round. With `fuse_evaluate`
    no evaluate messages are sent: the clients evaluate the model they receive inside the
    fit message (`fuse-evaluate`), and round r's `distributed` record (the evaluation of
    round r-1's model) is the strategy's `aggregate_evaluate` of those reports. Each
    client's own report goes into the record too (`client_evaluations`, by client id) with
    their spread across clients (`fairness`, worse and better by `directions`, the
    metrics' "up"/"down"), except under DP, whose guarantee does not cover them (a protected
    run has no distributed evaluation at all). With `sample_by_size` clients are drawn in
    proportion to their training-set size (`SeededClientManager`), the sizes checked and
    capped by `size_claims` (`examples-cap-factor`, `max-examples`).
    """

    def __init__(self, *, strategy: Strategy, seed: int, stopping: StoppingRules,
                 on_round: RoundCallback, on_finish: Callable[[str, Parameters], None],
                 on_checkpoint: CheckpointCallback | None = None,
                 on_charge: Callable[[dict[str, Any]], None] | None = None,
                 resume: ResumePoint | None = None, secure_fit: FitRound | None = None,
                 fuse_evaluate: bool = False, statistics: StatisticsRound | None = None,
                 directions: Mapping[str, str] | None = None,
                 sample_by_size: bool = False, size_claims: tuple[float, int] = (0.0, 0),
                 ) -> None:
        self.wire = metered(strategy)  # counts the round's parameter bytes up and down
        super().__init__(client_manager=SeededClientManager(seed, sample_by_size, *size_claims),
                         strategy=self.wire)
        self.privacy = privacy_layer(strategy)
        self.stopping = stopping
        self.on_round = on_round
        self.on_finish = on_finish
        self.on_checkpoint = on_checkpoint
        self.on_charge = on_charge
        self.resume = resume
        self.secure_fit = secure_fit
        self.fuse_evaluate = fuse_evaluate
        self.statistics = statistics
        self.directions = directions
        self._quality_seen: set[str] = set()

    @property
    def seeded_manager(self) -> SeededClientManager:
        """This server's client manager (the seeded one `__init__` gives Flower's base)."""
        return cast(SeededClientManager, self.client_manager())

    def server_state(self, stopped: str | None) -> dict[str, Any]:
        """Everything besides the weights that the next round depends on."""
        return {"strategy": strategy_state(self.strategy),
                "client_manager": self.seeded_manager.get_state(),
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
        self.seeded_manager.set_state(state["client_manager"])
        self.stopping.set_state(state["stopping"])
        log(INFO, "resuming after round %s", resume.round)
        if state["stopped"]:
            log(INFO, "the checkpointed run had already stopped (%s)", state["stopped"])
        return state["stopped"]

    def fit_round(self, server_round: int, timeout: float | None) -> Any:
        """One fit round: through `secure_fit` when set, else Flower's plaintext round;
        with a strategy that streams the round (`StreamsFit`), each reply is added to the
        round's sum as it arrives and its tensors dropped (`fit_clients_streamed`)."""
        if self.secure_fit is not None:
            return self.secure_fit(self, server_round)
        return self._streamed_fit_round(server_round, timeout)

    def _streamed_fit_round(self, server_round: int, timeout: float | None) -> Any:
        """Flower's `Server.fit_round` (same logs, same return), with the round's replies
        added to the strategy's stream as they arrive when it opens one. `self.strategy` is
        asked, not `self.wire`: a caller that wraps the server's strategy (a recorder, an
        audit layer) and does not stream gets Flower's whole round through its wrapper."""
        instructions = self.strategy.configure_fit(
            server_round=server_round, parameters=self.parameters,
            client_manager=self._client_manager)
        if not instructions:
            log(INFO, "configure_fit: no clients selected, cancel")
            return None
        log(INFO, "configure_fit: strategy sampled %s clients (out of %s)", len(instructions),
            self._client_manager.num_available())
        stream = (self.strategy.open_fit_stream(server_round)
                  if isinstance(self.strategy, StreamsFit) else None)
        if stream is None:
            results, failures = fit_clients(instructions, self.max_workers, timeout,
                                            server_round)
        else:
            results, failures = fit_clients_streamed(instructions, self.max_workers, timeout,
                                                     server_round, stream)
        log(INFO, "aggregate_fit: received %s results and %s failures", len(results),
            len(failures))
        parameters, metrics = (self.strategy.aggregate_fit(server_round, results, failures)
                               if stream is None else stream.finish(failures))
        return parameters, metrics, (results, failures)

    def _evaluate_centralized(self, server_round: int, history: History) -> dict[str, Any]:
        res = self.strategy.evaluate(server_round, parameters=self.parameters)
        if res is None:
            return {}
        loss, metrics = res
        history.add_loss_centralized(server_round=server_round, loss=loss)
        history.add_metrics_centralized(server_round=server_round, metrics=metrics)
        return evaluation_section(loss, metrics)

    def _fit(self, server_round: int, timeout: float | None,
             history: History) -> tuple[dict[str, Any], int, list[tuple[ClientProxy, FitRes]]]:
        """Run the round's training; return its record, how many client updates made it
        into a new global model (0 when the strategy kept the previous one; under DP 1 for
        every released model, see the class doc) and the clients' replies."""
        res_fit = self.fit_round(server_round=server_round, timeout=timeout)
        if self.privacy is not None and self.on_charge is not None:
            self.on_charge(self.privacy.ledger())  # before anything of the round is released
        if res_fit is None:
            return {"num_sampled": 0, "num_clients": 0, "num_failures": 0,
                    "num_rejected": 0}, 0, []
        parameters, metrics, (results, failures) = res_fit
        if parameters:
            self.parameters = parameters
        else:
            log(WARNING, "round %s: no aggregate, the global model is unchanged", server_round)
        metrics = _without_client_reports(metrics)
        history.add_metrics_distributed_fit(server_round=server_round, metrics=metrics)
        described = [describe_failure(f) for f in failures]
        for failure in described:
            log(WARNING, "round %s: client %s failed: %s", server_round,
                failure["client"], last_line(failure["error"]))
        private = self.privacy is not None  # under DP, per-client reports are not released
        record = fit_section(metrics, replies=len(results), failures=described,
                             timing={} if private else mean_timing(r.metrics for _, r in results))
        if not private:
            reports = data_quality(results, self._quality_seen)
            if reports:
                record["data_quality"] = reports
        if not parameters:
            return record, 0, results
        if self.privacy is not None:  # a released DP round is progress, whoever answered
            return record, 1, results
        return record, record["num_clients"] - record["num_rejected"], results

    def _evaluate_distributed(
            self, server_round: int, timeout: float | None, history: History,
            fitted: list[tuple[ClientProxy, FitRes]],
    ) -> tuple[dict[str, Any], list[tuple[ClientProxy, EvaluateRes]]]:
        """The round's distributed evaluation and the clients' reports: evaluate messages,
        or with `fuse_evaluate` the reports in the fit replies `fitted` (of the previous
        round's model)."""
        if self.fuse_evaluate:
            evaluations = fused_evaluations(fitted)
            if not evaluations:
                return {}, []
            loss, metrics = self.strategy.aggregate_evaluate(server_round, evaluations, [])
        else:
            res_fed = self.evaluate_round(server_round=server_round, timeout=timeout)
            if res_fed is None:
                return {}, []
            # loss is None when every report was rejected or failed
            loss, metrics, (evaluations, _) = res_fed
        if loss is not None:
            history.add_loss_distributed(server_round=server_round, loss=loss)
        history.add_metrics_distributed(server_round=server_round, metrics=metrics)
        return evaluation_section(loss, metrics), evaluations

    def _per_client(self, evaluations: list[tuple[ClientProxy, EvaluateRes]]) -> dict[str, Any]:
        """The round record's `client_evaluations` and `fairness` (none under DP)."""
        reports = client_evaluations(evaluations) if self.privacy is None else {}
        if not reports:
            return {}
        return {EVALUATIONS: reports, FAIRNESS: fairness(reports, self.directions)}

    def _statistics_round(self, statistics: StatisticsRound, timeout: float | None) -> None:
        """Every connected client's data sums, pooled (a client that fails is left out,
        logged)."""
        clients = self.client_manager().all()
        ins = FitIns(Parameters(tensors=[], tensor_type="numpy.ndarray"),
                     dict(STATISTICS_CONFIG))
        results, failures = fit_clients([(clients[cid], ins) for cid in sorted(clients)],
                                        self.max_workers, timeout, 0)
        for failure in map(describe_failure, failures):
            log(WARNING, "statistics round: client %s failed: %s", failure["client"],
                last_line(failure["error"]))
        statistics.add([(proxy.cid, _decoded_or_none(res.parameters))
                        for proxy, res in results])

    def _start(self, timeout: float | None, history: History) -> tuple[int, str | None]:
        """Round 0 (or the restored checkpoint): the first round to run and any stop reason.
        The clients are started first, so round 1's time is a round's, not the start-up's."""
        self.seeded_manager.warm_up()
        if self.statistics is not None:
            self._statistics_round(self.statistics, timeout)
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
            fit, accepted, fitted = self._fit(server_round, timeout, history)
            fit_cpu = time.process_time() - cpu_start
            record = {"round": server_round, "fit": fit, "bytes": self.wire.take(),
                      "server_cpu_seconds": {"fit": fit_cpu},
                      "centralized": self._evaluate_centralized(server_round, history)}
            record["distributed"], evaluations = self._evaluate_distributed(
                server_round, timeout, history, fitted)
            record.update(self._per_client(evaluations))
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

