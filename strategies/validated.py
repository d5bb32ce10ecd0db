"""The one validation path: every strategy the registry builds sits behind it.

`ValidatedStrategy` rejects invalid client updates and evaluation reports (the checks of
`strategies.validation`) before the strategy it wraps sees them: ours, Flower's built-ins
and the DP wrappers alike. It is also the one place of the `min-fit-clients` rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from logging import WARNING

from flwr.common import EvaluateRes, FitIns, FitRes, NDArrays, Parameters, Scalar
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from strategies.blas import one_blas_thread
from strategies.decoding import without_tensors
from strategies.dp import DPFixedClipping
from strategies.flower_builtins import aggregate_average, averages_updates
from strategies.protocols import FitStream
from strategies.running_sum import CappedWeightedSum, RunningWeightedSum
from strategies.validation import (
    NUM_CAPPED,
    NUM_REJECTED,
    FitResults,
    Rejections,
    Res,
    arrays_problem,
    cap_claims,
    cast_like,
    decode_update,
    reference_arrays,
    reject,
    validate_evaluate_results,
    validate_fit_results,
)
from strategies.weighted_fedavg import sums_updates
from strategies.wrapper import StrategyWrapper

RESERVED = {NUM_REJECTED, NUM_CAPPED}  # the server's counts: never taken from a client
STREAM_HOLD = 3  # updates a round folded as its replies arrive keeps for the examples cap
STREAM_REORDER_BYTES = 64 * 2**20  # bytes of replies a stream keeps waiting (sample order)


def _without_reserved_metrics(
        results: list[tuple[ClientProxy, Res]]) -> list[tuple[ClientProxy, Res]]:
    """The results with any client-reported `num_rejected`/`num_capped` metric dropped: those
    counts are the server's, and a client must not be able to forge them."""
    return [(proxy, replace(res, metrics={k: v for k, v in res.metrics.items()
                                          if k not in RESERVED}))
            if RESERVED & set(res.metrics) else (proxy, res) for proxy, res in results]


SumAggregator = Callable[
    [int, RunningWeightedSum, FitResults, list[tuple[ClientProxy, FitRes] | BaseException]],
    tuple[Parameters | None, dict[str, Scalar]]]
"""`aggregate_fit` of updates already folded into a running sum: (round, sum, results
without their updates, failures)."""


def sum_aggregator(inner: Strategy) -> SumAggregator | None:
    """How `inner` aggregates a running sum of the updates instead of the updates: our
    weighted average's `aggregate_sum` (`sums_updates`), or one of Flower's averaging
    strategies through `aggregate_average` (`averages_updates`); None for any other."""
    if sums_updates(inner):
        return inner.aggregate_sum
    if averages_updates(inner):
        return partial(aggregate_average, inner)
    return None


class ValidatedStrategy(StrategyWrapper):
    """Rejects invalid client updates and evaluation reports before `inner` sees them.

    Checks each update against the global model sent this round (or the initial one
    before the first round): see `strategies.validation`. Adds `num_rejected` (ours plus
    any the inner strategy rejected itself) to the round's fit and evaluate metrics.
    With fewer than `min_fit_clients` valid updates the round keeps the previous global
    model; `min_fit_clients=0` never holds a round back (the DP wrappers release every
    round: skipping one would reveal, un-noised, that clients failed).
    The aggregate keeps the dtypes of the model sent (Flower's FedOpt family computes in
    float64, which would otherwise make every float32 client update mismatch next round).
    When `inner` averages the updates (`sum_aggregator`: WeightedFedAvg, Flower's FedAvg,
    FedProx, FedOpt family and FedAvgM) each update is decoded once, without a copy, and
    checked and folded into a running sum (`CappedWeightedSum`); any other inner strategy
    gets the accepted results to decode itself. For such an inner strategy, and for the
    central DP wrappers, a server loop may also check and fold each reply as it arrives
    (`open_fit_stream`) and drop it, with the same result bit for bit.

    Args:
        inner: the strategy that aggregates the valid updates.
        min_fit_clients: fewest valid updates that make a new global model (0: no minimum).
        max_examples: cap on a client's claimed `num_examples` (0: no cap).
        outlier_norm_factor: reject updates whose norm exceeds this factor times the
            round's median update norm (0: off).
        examples_cap_factor: cap claimed `num_examples` at this factor times the round's
            lower median claim (0: off); capped claims are counted as `num_capped`.
        stream_hold: updates with the largest claims a running sum keeps unfolded until
            the round's cap is known (`CappedWeightedSum`).
        stream_reorder_bytes: most bytes of replies a streamed round keeps waiting for an
            earlier client's (`ValidatedFitStream`).
    """

    def __init__(self, inner: Strategy, *, min_fit_clients: int, max_examples: int = 0,
                 outlier_norm_factor: float = 0.0, examples_cap_factor: float = 0.0,
                 stream_hold: int = STREAM_HOLD,
                 stream_reorder_bytes: int = STREAM_REORDER_BYTES) -> None:
        super().__init__(inner)
        self.stream_hold = stream_hold
        self.stream_reorder_bytes = stream_reorder_bytes
        self.min_fit_clients = min_fit_clients
        self.max_examples = max_examples
        self.outlier_norm_factor = outlier_norm_factor
        self.examples_cap_factor = examples_cap_factor
        self._sent: Parameters | None = None
        self._order: dict[str, int] = {}  # each sampled client's place in the round's sample

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Remember the initial global model (the reference until a round is sent)."""
        parameters = self.inner.initialize_parameters(client_manager)
        self._sent = parameters
        return parameters

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Remember the global model sent this round, delegate, and remember the order of the
        sample (the order the round's updates are folded in)."""
        self._sent = parameters
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        self._order = {proxy.cid: place for place, (proxy, _) in enumerate(instructions)}
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Drop invalid updates, then let the inner strategy aggregate the rest (through the
        stream a streamed round feeds, `_aggregate_stream`, when the inner strategy takes
        one).

        Raises RuntimeError if no global model was sent or initialized yet.
        """
        reference = reference_arrays(self._sent, self, server_round)
        stream = self._stream(server_round, reference)
        if stream is not None:
            return self._aggregate_stream(stream, results, failures)
        checked = validate_fit_results(results, reference, server_round,
                                       self.max_examples, self.outlier_norm_factor)
        if len(checked.accepted) < self.min_fit_clients:
            return self._too_few(server_round, len(checked.accepted), checked.rejected)
        accepted, capped = cap_claims(_without_reserved_metrics(checked.accepted),
                                      self.examples_cap_factor, server_round)
        parameters, metrics = self.inner.aggregate_fit(server_round, accepted, failures)
        if parameters is not None:
            parameters = cast_like(parameters, reference)
        return parameters, {**_with_rejections(metrics, len(checked.rejected)),
                            NUM_CAPPED: capped}

    def _aggregate_stream(
        self,
        stream: ValidatedFitStream,
        results: FitResults,
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """`aggregate_fit` through the `ValidatedFitStream` a streamed round feeds as its
        replies arrive, the results added in the order of the round's sample (the order
        the stream folds them in), so both give the same model bit for bit. Here every
        update is still at hand: when the stream could not give every update its exact
        capped weight (more than `stream_hold` claims above the cap), the accepted ones are
        folded again with every one held (the cap rule exactly). With an outlier-norm
        factor the updates are screened first (the median norm needs them all)."""
        results = sorted(results, key=lambda result: self._order.get(result[0].cid,
                                                                     len(self._order)))
        arrays: list[NDArrays | None] = [None] * len(results)
        if self.outlier_norm_factor:
            checked = validate_fit_results(results, stream.reference, stream.server_round,
                                           self.max_examples, self.outlier_norm_factor)
            stream.rejected, results = checked.rejected, checked.accepted
            arrays = list(checked.accepted_arrays)
        accepted = [(proxy, res) for (proxy, res), decoded in zip(results, arrays)
                    if stream.add(proxy, res, decoded)]
        if not stream.exact:
            exact = self._stream(stream.server_round, stream.reference, hold=len(accepted))
            assert exact is not None  # the same inner strategy
            exact.rejected = stream.rejected
            for proxy, res in accepted:
                exact.add(proxy, res)
            stream = exact
        return stream.finish(failures)

    def _stream(self, server_round: int, reference: NDArrays,
                hold: int | None = None) -> ValidatedFitStream | None:
        """The round's `ValidatedFitStream` (`hold`: default `stream_hold`), when the inner
        strategy averages the updates (`sum_aggregator`) or is a central DP wrapper
        (`DPFixedClipping`, whose own stream then takes the checked replies); else None."""
        inner = None
        if sum_aggregator(self.inner) is None:
            inner = (self.inner.open_fit_stream(server_round)
                     if isinstance(self.inner, DPFixedClipping) else None)
            if inner is None:
                return None
        return ValidatedFitStream(self, server_round, reference,
                                  self.stream_hold if hold is None else hold, inner)

    def open_fit_stream(self, server_round: int) -> ValidatedFitStream | None:
        """A stream that checks each reply as it arrives (`strategies.protocols.StreamsFit`)
        and folds it into the round's sum, when the inner strategy averages the updates
        (`sum_aggregator`), or passes it to the inner strategy's stream, when that is a
        central DP wrapper's (`DPFixedClipping`: it weighs every update alike, so it needs
        no claim capped); None when the inner strategy needs the whole round (robust
        aggregators, FedNova, QFedAvg) or a check does (`outlier_norm_factor`).

        Raises RuntimeError if no global model was sent or initialized yet.
        """
        if self.outlier_norm_factor:
            return None
        return self._stream(server_round, reference_arrays(self._sent, self, server_round))

    def _too_few(self, server_round: int, valid: int,
                 rejected: Rejections) -> tuple[None, dict[str, Scalar]]:
        """The answer of a round with fewer than `min_fit_clients` valid updates (logged)."""
        log(WARNING, "round %s: only %s valid update(s), fewer than min-fit-clients=%s: "
            "keeping the previous global model", server_round, valid, self.min_fit_clients)
        return None, {NUM_REJECTED: len(rejected)}

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        """Drop invalid evaluation reports, then let the inner strategy aggregate the rest."""
        checked = validate_evaluate_results(results, server_round, self.max_examples)
        accepted, capped = cap_claims(_without_reserved_metrics(checked.accepted),
                                      self.examples_cap_factor, server_round)
        loss, metrics = self.inner.aggregate_evaluate(server_round, accepted, failures)
        return loss, {**_with_rejections(metrics, len(checked.rejected)), NUM_CAPPED: capped}


class ValidatedFitStream:
    """One round's fit replies checked as `ValidatedStrategy.aggregate_fit` checks them,
    one by one (`strategies.protocols.FitStream`), and folded into a `CappedWeightedSum`
    for an inner strategy that averages, or passed to the inner strategy's own stream
    `inner` (the DP wrappers', which weigh every update alike).

    `add` strips a reply's reserved metrics and rejects it (logged, counted) on a bad
    claim, undecodable bytes, a wrong structure or a non-finite value, before anything of
    it touches the sum; the caller may drop the reply's tensors as soon as `add` returns.
    Accepted updates are folded (or passed on) in the order of the round's sample, not
    the order they arrive, so a run folds the same sums whichever client answers first:
    an update waits (a view of its reply's bytes) until every client before it in the
    sample has been folded, rejected or `skip`ped (it failed). When the waiting updates
    take more than `owner.stream_reorder_bytes`, the earliest waiting one is folded
    without waiting further (bounded memory; then a run's sums depend on the order of
    arrival, within float rounding: with the default 64 MiB, a model of a few MiB waits
    for dozens of replies, a 36.5 MiB one for one). `finish` folds what still waits, applies the
    `min-fit-clients` rule and the examples cap to the kept results (their metrics weigh
    by the capped claims; an inner stream saw the claims uncapped, which only counts
    them) and makes the model from the sum or the inner stream.
    """

    def __init__(self, owner: ValidatedStrategy, server_round: int, reference: NDArrays,
                 hold: int, inner: FitStream | None = None) -> None:
        self.owner = owner
        self.server_round = server_round
        self.reference = reference
        self.inner = inner
        self.sum = (CappedWeightedSum(reference, owner.examples_cap_factor, hold)
                    if inner is None else None)
        self.accepted: FitResults = []
        self.rejected: Rejections = []
        self._order = owner._order  # each sampled client's place in the sample
        self._next = 0  # the place folded next
        self._waiting: dict[int, tuple[ClientProxy, FitRes, NDArrays]] = {}
        self._waiting_bytes = 0
        self._skipped: set[int] = set()  # places that will send nothing to fold
        self._placed: set[str] = set()  # clients already given their place

    @one_blas_thread()  # the check and the fold share one limit
    def add(self, proxy: ClientProxy, res: FitRes, arrays: NDArrays | None = None) -> bool:
        """Check one reply, then fold its update or pass it on, now or once the clients
        before it in the sample are done (`arrays`: its update already decoded); whether
        it was accepted. The stream keeps the reply's claim and metrics, never its tensors
        (only the views of the updates that wait or are held, `CappedWeightedSum`)."""
        ((proxy, res),) = _without_reserved_metrics([(proxy, res)])
        problem = None
        if arrays is None:
            arrays, problem = decode_update(res, self.owner.max_examples)
        if arrays is not None:
            problem = arrays_problem(arrays, self.reference)
        place = self._place(proxy)
        if problem is not None:
            reject(self.rejected, "update", proxy, problem, self.server_round)
            self._skip(place)
            return False
        assert arrays is not None  # decode_update gives the arrays or a problem
        self.accepted.append((proxy, without_tensors(res)))
        if place is None or place < self._next:  # not in the sample, or given up waiting for
            self._fold(proxy, res, arrays)
        else:
            self._waiting[place] = (proxy, res, arrays)
            self._waiting_bytes += sum(a.nbytes for a in arrays)
            self._release()
        return True

    def skip(self, proxy: ClientProxy) -> None:
        """`proxy` failed: it sends nothing this round, so no update waits for it."""
        self._skip(self._place(proxy))

    def _place(self, proxy: ClientProxy) -> int | None:
        """The client's place in the sample (None: not sampled, or it was placed already)."""
        place = self._order.get(proxy.cid)
        if place is None or proxy.cid in self._placed:
            return None
        self._placed.add(proxy.cid)
        return place

    def _skip(self, place: int | None) -> None:
        if place is not None:
            self._skipped.add(place)
            self._release()

    def _release(self) -> None:
        """Fold the waiting updates whose turn it is; past `stream_reorder_bytes` waiting,
        stop waiting for the missing places before the earliest."""
        while True:
            if self._next in self._waiting:
                self._fold_waiting(self._next)
            elif self._next not in self._skipped:
                if self._waiting_bytes <= self.owner.stream_reorder_bytes:
                    return
                self._next = min(self._waiting)
                continue
            self._next += 1

    def _fold_waiting(self, place: int) -> None:
        """Fold the update waiting at `place`."""
        proxy, res, arrays = self._waiting.pop(place)
        self._waiting_bytes -= sum(a.nbytes for a in arrays)
        self._fold(proxy, res, arrays)

    def _fold(self, proxy: ClientProxy, res: FitRes, arrays: NDArrays) -> None:
        """Fold one checked update into the sum, or pass its reply to the inner stream."""
        if self.sum is not None:
            self.sum.take(arrays, res.num_examples)
        else:
            assert self.inner is not None
            self.inner.add(proxy, res)

    @property
    def exact(self) -> bool:
        """Whether every update folded so far has its exact capped weight
        (`CappedWeightedSum.exact`)."""
        return self.sum is None or self.sum.exact

    def finish(
        self, failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """What `aggregate_fit` returns for the replies added (`failures`: the round's)."""
        for place in sorted(self._waiting):
            self._fold_waiting(place)
        owner, server_round = self.owner, self.server_round
        if len(self.accepted) < owner.min_fit_clients:
            return owner._too_few(server_round, len(self.accepted), self.rejected)
        accepted, capped = cap_claims(self.accepted, owner.examples_cap_factor, server_round)
        if self.inner is not None:
            parameters, metrics = self.inner.finish(failures)
            if parameters is not None:
                parameters = cast_like(parameters, self.reference)
        else:
            assert self.sum is not None
            if not self.sum.exact:  # never average in a weight the cap rule would not give
                log(WARNING, "round %s: more than %s claims exceeded the examples cap before "
                    "the round's cap was known, so the streamed sum cannot weigh them as the "
                    "rule does: keeping the previous global model", server_round,
                    self.sum.hold)
                return None, {NUM_REJECTED: len(self.rejected), NUM_CAPPED: capped}
            aggregate = sum_aggregator(owner.inner)
            assert aggregate is not None  # a stream without `inner` is opened only then
            parameters, metrics = aggregate(server_round, self.sum.finish(), accepted, failures)
        return parameters, {**_with_rejections(metrics, len(self.rejected)), NUM_CAPPED: capped}


def _with_rejections(metrics: dict[str, Scalar], rejected: int) -> dict[str, Scalar]:
    """`metrics` with `num_rejected` = ours plus the inner strategy's own rejections."""
    return {**metrics, NUM_REJECTED: rejected + int(metrics.get(NUM_REJECTED, 0))}
