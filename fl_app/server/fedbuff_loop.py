"""The FedBuff server loop (`server-loop='fedbuff'`) on Flower's message API.

Flower's `Server` plays synchronous rounds; FedBuff needs clients that keep training while
the server moves on. This loop pushes "train" messages itself (`Grid.push_messages`, the
same record layout as Flower's compat `GridClientProxy.fit`, so the app's legacy
`NumPyClient` answers them unchanged), keeps `concurrency` clients busy, and hands every
reply to `strategies.fedbuff.FedBuffAggregator`, which makes a new model version every K
accepted updates. A client that replies is sent the newest version at once; an idle
client is picked at random (seeded) among the connected ones.

Each version is one "round" of the rest of the app: centralized evaluation, a
history.json record (`round` = version, `seconds` since the previous version, `fit` with
the version's update, failure, rejection and staleness counts), the stopping rules and a
checkpoint. A checkpoint is written right after a version is made, when the buffer is
empty, so a resumed run loses only the training in flight at the crash; it restarts the
clients from the checkpointed version. Clients run no distributed evaluation here. When
the run stops, its results are written, then the loop waits for the clients still
training (their updates discarded) so that none answers a finished run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Message, MessageType
from flwr.common import (
    FitIns,
    GetPropertiesIns,
    MessageTypeLegacy,
    NDArrays,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl_app.flower_internals import SUPERLINK_NODE_ID, TaskIdentity
from fl_app.flower_internals import recorddict_compat as compat
from fl_app.server.round_record import evaluation_section, fit_section, mean_timing
from fl_app.server.runner import CheckpointCallback, ResumePoint, RoundCallback
from fl_app.server.stopping import IDLE_STOP, StoppingRules
from fl_app.wire import DATA_QUALITY_PREFIX, TIMING_PREFIX
from strategies.fedbuff import FedBuffAggregator

Evaluate = Callable[[int, NDArrays], "tuple[float, dict[str, Scalar]] | None"]
PULL_INTERVAL = 0.05  # seconds between polls for replies
DRAIN_SECONDS = 300.0  # the longest wait for clients in flight at the end of a run


def bind_task_identity(grid: Grid) -> None:
    """Make the process's Flower `TaskIdentity` (which every `Message` reads) this run's.

    A SuperLink's ServerApp process has it set already. Flower's in-process
    `run_simulation` sets it only inside its legacy `start_grid`, so a main-function
    ServerApp finds it unset, or holding an earlier run's id; set it as `start_grid` does.
    """
    TaskIdentity.run_id = grid.run.run_id
    try:
        _ = TaskIdentity.task_id
    except RuntimeError:
        TaskIdentity.task_id = 1
    try:
        _ = TaskIdentity.node_id
    except RuntimeError:
        TaskIdentity.node_id = SUPERLINK_NODE_ID


@dataclass
class Dispatch:
    """A train message in flight: to which node, from which version (and its weights)."""

    node_id: int
    version: int
    weights: NDArrays


@dataclass
class Tally:
    """What happened to arrivals since the last version."""

    failures: list[dict[str, str | None]] = field(default_factory=list)
    num_rejected: int = 0
    num_stale: int = 0
    replies_metrics: list[dict[str, Scalar]] = field(default_factory=list)

    def fit(self, aggregated: dict[str, Any], num_updates: int) -> dict[str, Any]:
        """The version's fit record (`fit_section`): as in a synchronous round, the replies
        count rejected ones and the clients' `time_*` metrics give the mean timing."""
        return fit_section(aggregated, replies=num_updates + self.num_rejected,
                           failures=self.failures, timing=mean_timing(self.replies_metrics),
                           num_rejected=self.num_rejected, num_stale=self.num_stale)


class FedBuffServer:
    """Runs FedBuff on a `Grid` until `num_versions`, a stopping rule or idleness ends it.

    Args:
        aggregator: the FedBuff state (initial or resumed weights and version).
        evaluate: centralized evaluation `(version, weights) -> (loss, metrics)` or None.
        fit_config: the fit config sent with a version (`fl_app.wire.round_config`).
        stopping: the run's stopping rules; `max_idle_rounds` x K arrivals in a row
            without an accepted update stop the run as `IDLE_STOP`.
        on_round, on_finish, on_checkpoint: the recorder's and checkpointer's callbacks.
        num_versions: the last version to make (`num-server-rounds`).
        concurrency: clients training at once (0: every connected client).
        min_available: connected clients to wait for before starting.
        seed: seeds the choice of idle clients.
        timeout: seconds a train message may take (None: Flower's default TTL).
        resume: a checkpoint's version, weights and server state to continue from.
    """

    def __init__(self, *, aggregator: FedBuffAggregator, evaluate: Evaluate,
                 fit_config: Callable[[int], dict[str, Scalar]], stopping: StoppingRules,
                 on_round: RoundCallback, on_finish: Callable[[str, Any], None],
                 on_checkpoint: CheckpointCallback, num_versions: int, concurrency: int,
                 min_available: int, seed: int, timeout: float | None = None,
                 resume: ResumePoint | None = None) -> None:
        self.aggregator = aggregator
        self.evaluate = evaluate
        self.fit_config = fit_config
        self.stopping = stopping
        self.on_round = on_round
        self.on_finish = on_finish
        self.on_checkpoint = on_checkpoint
        self.num_versions = num_versions
        self.concurrency = concurrency
        self.min_available = min_available
        self.seed = seed
        self.timeout = timeout
        self.resume = resume
        self.in_flight: dict[str, Dispatch] = {}
        self.rng = np.random.default_rng([seed, aggregator.version])

    def server_state(self, stopped: str | None) -> dict[str, Any]:
        """What a resumed run needs besides the weights."""
        return {"fedbuff": {"version": self.aggregator.version},
                "stopping": self.stopping.get_state(), "stopped": stopped}

    def _checkpoint(self, stopped: str | None) -> None:
        self.on_checkpoint(self.aggregator.version,
                           ndarrays_to_parameters(self.aggregator.weights),
                           self.server_state(stopped))

    def _centralized(self) -> dict[str, Any]:
        res = self.evaluate(self.aggregator.version, self.aggregator.weights)
        if res is None:
            return {}
        loss, metrics = res
        return evaluation_section(loss, metrics)

    def _warm_up(self, grid: Grid) -> None:
        """Wait for `min_available` clients and ask each for its properties, which starts
        its ClientApp (in simulation: a worker importing TensorFlow and loading its data),
        so that the first version's `seconds` measure training, not start-up."""
        while len(list(grid.get_node_ids())) < self.min_available:
            time.sleep(PULL_INTERVAL)
        ins = compat.getpropertiesins_to_recorddict(GetPropertiesIns({}))
        messages = [Message(ins, dst_node_id=node, message_type=MessageTypeLegacy.GET_PROPERTIES,
                            ttl=self.timeout) for node in grid.get_node_ids()]
        pending = set(grid.push_messages(messages))
        while pending:
            pending -= {r.metadata.reply_to_message_id for r in grid.pull_messages(pending)}
            time.sleep(PULL_INTERVAL)

    def _dispatch(self, grid: Grid) -> None:
        """Send the current version to idle clients until `concurrency` are busy."""
        busy = {d.node_id for d in self.in_flight.values()}
        idle = sorted(set(grid.get_node_ids()) - busy)
        limit = self.concurrency or len(busy) + len(idle)
        count = min(len(idle), limit - len(busy))
        if count <= 0:
            return
        # Indices, not the ids themselves: node ids are unsigned 64-bit and numpy would turn
        # a mix of large and small ones into floats.
        chosen = [idle[i] for i in self.rng.permutation(len(idle))[:count]]
        agg = self.aggregator
        ins = FitIns(ndarrays_to_parameters(agg.weights), self.fit_config(agg.version))
        for node in chosen:
            content = compat.fitins_to_recorddict(ins, keep_input=True)
            message = Message(content, dst_node_id=node, message_type=MessageType.TRAIN,
                              group_id=str(agg.version), ttl=self.timeout)
            for message_id in grid.push_messages([message]):  # none if the node is gone
                self.in_flight[message_id] = Dispatch(node, agg.version, agg.weights)

    def _receive(self, reply: Message, tally: Tally) -> bool:
        """Hand one reply to the aggregator; True if its update was accepted."""
        sent = self.in_flight.pop(reply.metadata.reply_to_message_id)
        arrival_problem: str | None
        staleness: int | None
        if reply.has_error():
            tally.failures.append({"client": str(sent.node_id), "error": reply.error.reason})
            log(WARNING, "FedBuff: client %s failed: %s", sent.node_id, reply.error.reason)
            return False
        try:
            res = compat.recorddict_to_fitres(reply.content, keep_input=False)
            arrays = parameters_to_ndarrays(res.parameters)
        except Exception as err:  # a malformed reply from a broken client
            arrival_problem, staleness = f"the reply cannot be decoded: {err}", None
        else:
            tally.replies_metrics.append(res.metrics)
            metrics = {k: v for k, v in res.metrics.items()
                       if not k.startswith((DATA_QUALITY_PREFIX, TIMING_PREFIX))}
            arrival = self.aggregator.add(arrays, res.num_examples, base_version=sent.version,
                                          base_weights=sent.weights, metrics=metrics)
            arrival_problem, staleness = arrival.problem, arrival.staleness
        if arrival_problem is None:
            return True
        tally.num_rejected += 1
        if staleness is not None and staleness > self.aggregator.max_staleness:
            tally.num_stale += 1
        log(WARNING, "FedBuff version %s: rejected update from client %s: %s",
            self.aggregator.version + 1, sent.node_id, arrival_problem)
        return False

    def _start(self, grid: Grid) -> tuple[bool, str | None]:
        """Round 0 or the restored checkpoint: whether to run on, and any stop reason."""
        if self.resume is not None:
            state = self.resume.server_state
            self.stopping.set_state(state["stopping"])
            log(INFO, "FedBuff: resuming after version %s", self.resume.round)
            return state["stopped"] is None, state["stopped"]
        self._warm_up(grid)
        self.on_round({"round": 0, "seconds": 0.0, "centralized": self._centralized()},
                      ndarrays_to_parameters(self.aggregator.weights))
        self._checkpoint(None)
        return True, None

    def _new_version(self, tally: Tally, since: float) -> str | None:
        step = self.aggregator.apply()
        record: dict[str, Any] = {"round": step.version,
                                  "fit": tally.fit(step.record(), step.num_updates)}
        centralized = self._centralized()
        if centralized:
            record["centralized"] = centralized
        record["seconds"] = time.perf_counter() - since
        self.on_round(record, ndarrays_to_parameters(self.aggregator.weights))
        reason = self.stopping.after_round(record, step.num_updates)
        # As in the synchronous loop, only a stopping rule marks the checkpoint stopped: a
        # run that reached num-server-rounds continues when resumed with more.
        self._checkpoint(reason)
        if reason is None and step.version >= self.num_versions:
            reason = "num-server-rounds"
        return reason

    def run(self, grid: Grid) -> str:
        """Train until the run stops; return why (history's `stopped`)."""
        bind_task_identity(grid)
        run_on, stopped = self._start(grid)
        stopped = stopped or "num-server-rounds"
        if run_on and self.aggregator.version < self.num_versions:
            if self.resume is not None:
                self._warm_up(grid)
            stopped = self._loop(grid)
        log(INFO, "run stopped: %s", stopped)
        self.on_finish(stopped, ndarrays_to_parameters(self.aggregator.weights))
        self._drain(grid)
        return stopped

    def _drain(self, grid: Grid) -> None:
        """Wait for the clients still training (their updates are discarded), so that none
        answers a finished run; at most `timeout` seconds (`DRAIN_SECONDS` without one)."""
        deadline = time.monotonic() + (self.timeout or DRAIN_SECONDS)
        while self.in_flight and time.monotonic() < deadline:
            for reply in grid.pull_messages(list(self.in_flight)):
                self.in_flight.pop(reply.metadata.reply_to_message_id, None)
            time.sleep(PULL_INTERVAL)
        if self.in_flight:
            log(WARNING, "FedBuff: %s client(s) still training when the run ended",
                len(self.in_flight))

    def _loop(self, grid: Grid) -> str:
        idle_limit = self.stopping.max_idle_rounds * self.aggregator.buffer_size
        idle_arrivals = 0
        tally, since = Tally(), time.perf_counter()
        while True:
            self._dispatch(grid)
            replies = list(grid.pull_messages(list(self.in_flight)))
            if not replies:
                time.sleep(PULL_INTERVAL)
            for reply in replies:
                accepted = self._receive(reply, tally)
                idle_arrivals = 0 if accepted else idle_arrivals + 1
                if idle_limit and idle_arrivals >= idle_limit:
                    return IDLE_STOP
                if self.aggregator.ready():
                    reason = self._new_version(tally, since)
                    if reason:
                        return reason
                    tally, since = Tally(), time.perf_counter()
