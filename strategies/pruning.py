"""Magnitude pruning during federated training, with the mask agreed by the server.

`prune-sparsity` s_f (0: off) is the fraction of every kernel's entries (a weight array of
two or more axes: Dense and convolution kernels, embeddings; biases and normalization
parameters are never pruned) that the global model holds at zero once `prune-rounds` R
rounds have passed, reached on Zhu & Gupta's cubic schedule (2017, "To prune, or not to
prune"): after round r the global model has sparsity s(r) = s_f (1 - (1 - min(r, R)/R)^3),
so round 1 trains the dense initial model and the pruning slows down as it nears s_f.

The mask is the server's, and nothing but its sparsity travels: `PrunedStrategy` zeroes
the aggregate's smallest-magnitude entries per kernel (`magnitude_mask`), and each round's
fit config carries s(r-1) (`KEY_PRUNE_SPARSITY`). Each client derives the mask from the
weights it receives with the same function: in a model pruned to s, the ⌊s·n⌋ smallest
magnitudes of a kernel of n entries are its pruned zeros (ties, which only exact zeros can
make here, go to the lower flat index on both sides), so server and clients hold the same
mask bit for bit without sending it; under `compress-down` both derive it from the decoded
broadcast (the strategy sits inside `CompressedStrategy`), where a codec's rounding may add
zeros but the mask is still computed from identical arrays. Clients keep the pruned weights
at zero through local training (`fl_app.ml.trainer.KerasTrainer.fit`'s `pruned`), so their
update there is exactly zero and top-k, which never sends an exact zero, skips it.

The server rejects (logged, counted in `num_rejected`) an update with a non-zero weight
where the round's mask has a zero: an honest client cannot send one, so one that does
deviates from the protocol. After aggregation it zeroes the round's mask again (a server
optimizer's momentum or DP noise may have moved those entries) and then prunes to s(r), so
the global model the server evaluates, checkpoints and saves as `final_model.keras` holds
its zeros. Refused with secure aggregation and homomorphic encryption (the server sees no
single update to check: `strategies.secure.PER_UPDATE_CHECKS`,
`strategies.homomorphic.incompatibilities`) and with FedBuff (its loop has no strategy
rounds to schedule and check the mask in: `strategies.fedbuff.check_config`).
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.common.typing import Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fl_app.protocol.pruning_mask import (
    apply_mask,
    magnitude_mask,
    round_mask,
    scheduled_sparsity,
    unmasked_entries,
)
from fl_app.schema import Setting
from fl_app.wire import KEY_PRUNE_SPARSITY, SERVER_ROUND
from strategies.validation import NUM_REJECTED, FitResults
from strategies.wrapper import StrategyWrapper

SPARSITY = "prune_sparsity"  # fit metrics: the sparsity the round's aggregate was pruned to

SETTINGS = [
    Setting("prune-sparsity", float, 0.0,
            "Magnitude pruning: the fraction of each kernel's entries (weight arrays of two or "
            "more axes; biases and normalization parameters are kept) the global model holds "
            "at zero after prune-rounds rounds, reached on a cubic schedule (Zhu & Gupta "
            "2017). The server prunes the aggregate and sends the round's sparsity; clients "
            "derive the same mask from the weights they receive, keep the pruned weights at "
            "zero and send them as zeros (top-k skips them); an update with a non-zero "
            "pruned weight is rejected (0: off). Not with secure-aggregation, "
            "homomorphic-encryption or fedbuff.", "compression", low=0.0, high=1.0,
            high_open=True),
    Setting("prune-rounds", int, 10,
            "Magnitude pruning: rounds over which the sparsity rises from 0 to prune-sparsity "
            "(the later rounds train the pruned model).", "compression", low=1),
]


class PrunedStrategy(StrategyWrapper):
    """Prunes the global model on the schedule and checks each update against the mask
    (see the module doc); `inner` aggregates the updates that respect it.

    Args:
        inner: the strategy that aggregates (the registry's validated chain).
        sparsity: the target sparsity of every kernel.
        rounds: the rounds over which the sparsity reaches `sparsity`.
    """

    def __init__(self, inner: Strategy, *, sparsity: float, rounds: int) -> None:
        super().__init__(inner)
        self.sparsity, self.rounds = sparsity, rounds
        self.mask: list[np.ndarray] | None = None  # the round's mask, as the clients derive it

    def __repr__(self) -> str:
        return f"PrunedStrategy({self.inner!r}, sparsity={self.sparsity}, rounds={self.rounds})"

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Delegate; derive the round's mask from the weights sent (pruned to the previous
        round's sparsity) and tell the clients that sparsity and the round (each client
        checks it against its own schedule, `check_round_sparsity`)."""
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        sparsity = scheduled_sparsity(server_round - 1, self.sparsity, self.rounds)
        config: dict[str, Scalar] = {KEY_PRUNE_SPARSITY: sparsity, SERVER_ROUND: server_round}
        self.mask = round_mask(config, parameters_to_ndarrays(parameters))
        if self.mask is None:
            return instructions
        return [(proxy, FitIns(ins.parameters, {**ins.config, **config}))
                for proxy, ins in instructions]

    def _respects_mask(self, server_round: int, proxy: ClientProxy, res: FitRes) -> bool:
        """Whether `res` keeps every masked weight at zero (logged when not). An update that
        does not decode is left to the inner validation."""
        if self.mask is None:
            return True
        try:
            weights = parameters_to_ndarrays(res.parameters)
            unmasked = unmasked_entries(weights, self.mask)
        except (ValueError, TypeError, IndexError):
            return True
        if unmasked:
            log(WARNING, "round %s: rejected update from client %s: %s of its pruned weights "
                "are not zero", server_round, proxy.cid, unmasked)
        return not unmasked

    def aggregate_fit(self, server_round: int, results: FitResults,
                      failures: list[tuple[ClientProxy, FitRes] | BaseException]
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Reject the updates that break the round's mask, let `inner` aggregate the rest,
        then zero the mask in the aggregate and prune it to this round's sparsity."""
        kept = [(proxy, res) for proxy, res in results
                if self._respects_mask(server_round, proxy, res)]
        parameters, metrics = self.inner.aggregate_fit(server_round, kept, failures)
        rejected = len(results) - len(kept)
        if rejected:
            metrics = {**metrics, NUM_REJECTED: int(metrics.get(NUM_REJECTED, 0)) + rejected}
        if parameters is None:
            return None, metrics
        weights = parameters_to_ndarrays(parameters)
        if self.mask is not None:
            weights = apply_mask(weights, self.mask)
        sparsity = scheduled_sparsity(server_round, self.sparsity, self.rounds)
        weights = apply_mask(weights, magnitude_mask(weights, sparsity))
        return ndarrays_to_parameters(weights), {**metrics, SPARSITY: sparsity}
