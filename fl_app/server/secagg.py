"""One fit round through Flower's SecAgg+ protocol, inside the app's own server loop.

Flower runs SecAgg+ (`SecAggPlusWorkflow`) only on its legacy workflow path, as the fit
step of a `DefaultWorkflow` over a `LegacyContext`. `SecAggPlusFit` runs that same fit step
for one round of `FederatedServer`, so the app's stopping rules, records, checkpoints,
resume and DP accounting work unchanged around it: `FederatedServer.fit_round` hands the
round to it and gets back what Flower's `Server.fit_round` returns.

A round with fewer sampled clients than `secagg-min-clients` is not started (nothing is
sent; the round halts with every sampled client named); the clients refuse such a round
too, and any unmasking of a smaller sum (`fl_app.client.secure_mod`).

What the strategy receives: the workflow unmasks only the sum of the clients' masked
vectors and puts that one aggregate into every answering client's `FitRes`, whose
`num_examples` is 1 and whose metrics are empty in a protected run (the clients' mods strip
them; the round's total example count is only inside the masked sum). Clients send their *update*
w − w_global scaled by n/max-weight (`fl_app.client.secure_mod`), so the aggregate is the
example-weighted mean update; `AggregateOnly` adds the global model back and casts it to
the model's dtypes, so the strategies see weights, as in a plaintext round.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    FitRes,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server import LegacyContext, Server
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from fl_app.flower_internals import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from fl_app.flower_internals import WorkflowKey as Key
from fl_app.flower_internals import recorddict_compat as compat
from fl_app.server.client_failures import ClientFailure
from fl_app.server.grid_wrapper import GridWrapper
from fl_app.server.prompt_grid import PromptGrid
from fl_app.server.wire_bytes import MeteredGrid
from strategies.wire_meter import ByteCounts, WireMeter
from strategies.wrapper import StrategyWrapper

FitOutcome = tuple[Parameters | None, dict[str, Scalar],
                   tuple[list[tuple[ClientProxy, FitRes]], list[Any]]]
"""What Flower's `Server.fit_round` returns: parameters, metrics, (results, failures)."""


def _brief(failure: object, keep: int = 200) -> str:
    """A failure's text, its start and end only when long (a ClientApp's error carries its
    whole traceback: what failed is at the start, the client's message at the end)."""
    text = str(failure)
    return text if len(text) <= 2 * keep else f"{text[:keep]} ... {text[-keep:]}"


class ReplyErrors(GridWrapper):
    """A Grid that notes the error of every reply pulled through it, by the sender's
    client id (`str(node_id)`, as `ClientProxy.cid`), so a client that dropped out of a
    SecAgg+ round is named with its own reason; every other call is the wrapped grid's."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.by_client: dict[str, str] = {}

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull from the wrapped grid, noting each error reply's reason."""
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            if reply.has_error():
                self.by_client[str(reply.metadata.src_node_id)] = _brief(reply.error.reason)
        return replies

    def failure(self, cid: str, what: str) -> ClientFailure:
        """Client `cid`'s failure: `what` happened, with its error reply's reason if any."""
        reason = self.by_client.get(cid)
        return ClientFailure(cid, RuntimeError(f"{what}: {reason}" if reason else what))


class AggregateOnly(StrategyWrapper):
    """The strategy as the SecAgg+ workflow sees it: turns the unmasked mean update into
    weights for `inner` and remembers the round's outcome for the server loop.

    Raises RuntimeError if the results do not all carry the one aggregate (the workflow
    would then have handed an individual update to the strategy).
    """

    def __init__(self, inner: Strategy, errors: ReplyErrors, min_clients: int) -> None:
        super().__init__(inner)
        self.errors = errors
        self.min_clients = min_clients
        self.refused = ""  # why the round was not started, if it was not
        self.sent: list[tuple[ClientProxy, Any]] = []
        self.outcome: FitOutcome | None = None
        self._reference: Parameters | None = None

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, Any]]:
        """Delegate; remember the global model and the clients sampled. Fewer than
        `min_clients` sampled: send nothing (the workflow then halts)."""
        self._reference = parameters
        self.sent = self.inner.configure_fit(server_round, parameters, client_manager)
        if len(self.sent) < self.min_clients:
            self.refused = (f"{len(self.sent)} clients sampled, fewer than secagg-min-clients "
                            f"({self.min_clients}): not started, nothing sent")
            return []
        return self.sent

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException],
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Hand `inner` the aggregate as weights (global model + mean update) in every
        answering client's result; name the clients that dropped out as failures, each with
        its own error reply's reason (`ReplyErrors`; Flower's `failures` carry the same
        errors without the client's id)."""
        if len({id(res.parameters) for _, res in results}) > 1:
            raise RuntimeError("SecAgg+ handed the strategy more than one update")
        answered = {proxy.cid for proxy, _ in results}
        dropped: list[Any] = [self.errors.failure(proxy.cid, "dropped out of the SecAgg+ round")
                              for proxy, _ in self.sent if proxy.cid not in answered]
        if results and self._reference is not None:
            weights = ndarrays_to_parameters([
                (np.asarray(ref, dtype=np.float64) + update).astype(ref.dtype)
                for ref, update in zip(parameters_to_ndarrays(self._reference),
                                       parameters_to_ndarrays(results[0][1].parameters),
                                       strict=True)])
            for _, res in results:
                res.parameters = weights
        parameters, metrics = self.inner.aggregate_fit(server_round, results, dropped)
        self.outcome = parameters, metrics, (results, dropped)
        return parameters, metrics


class SecAggPlusFit:
    """Runs `FederatedServer`'s fit rounds through `workflow` (a `SecAggPlusWorkflow`)
    over `grid` (polled promptly, its traffic metered), with `context` the ServerApp's
    context; a round with fewer than `min_clients` sampled is not started."""

    def __init__(self, workflow: SecAggPlusWorkflow, grid: Grid, context: Context,
                 min_clients: int) -> None:
        self.workflow = workflow
        self.meter = MeteredGrid(grid)
        self.context = context
        self.min_clients = min_clients

    def __call__(self, server: Server, server_round: int) -> FitOutcome:
        """One SecAgg+ fit round from `server`'s global model with `server`'s strategy
        and clients. A round that halted (too few clients sampled, or more dropped out or
        refused than the threshold allows) has no parameters and names every client sampled
        as a failure. The round's bytes are the protocol's messages, counted at the Grid."""
        errors = ReplyErrors(self.meter)  # a fresh note of error replies per round
        strategy = AggregateOnly(server.strategy, errors, self.min_clients)
        ctx = self.context
        legacy = LegacyContext(
            Context(run_id=ctx.run_id, node_id=ctx.node_id, node_config=ctx.node_config,
                    state=RecordDict(), run_config=ctx.run_config),
            strategy=strategy, client_manager=server.client_manager())
        legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            server.parameters, keep_input=True)
        legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: server_round})
        self.meter.counts.take()  # this round's traffic only
        self.workflow(PromptGrid(errors), legacy)
        wire = getattr(server, "wire", None)  # FederatedServer's meter (not Flower's Server)
        if isinstance(wire, WireMeter):
            wire.counts = ByteCounts(**self.meter.counts.take())
        if strategy.outcome is not None:
            return strategy.outcome
        what = "the SecAgg+ round halted before an aggregate"
        log(WARNING, "round %s: %s (%s)", server_round, what, strategy.refused or
            "too few clients, or more dropped out or refused than the reconstruction "
            "threshold allows")
        if strategy.refused:
            what += f" ({strategy.refused})"
        return None, {}, ([], [errors.failure(proxy.cid, what) for proxy, _ in strategy.sent])
