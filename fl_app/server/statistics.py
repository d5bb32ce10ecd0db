"""The statistics round of `standardize=true`: before round 0 the server asks every connected
client for the sums of its training data and adds them up (`fl_app.ml.standardize`).

Only the pooled statistics leave the server, in every later fit and evaluate config and in
`final_model.keras` (its Normalization and Rescaling layers); no client's sums are
recorded or logged. The round is plaintext: the configuration refuses `standardize` with
secure aggregation, homomorphic encryption and DP (`fl_app.server.settings`), where the
server must not see one client's sums or their release is outside the privacy accounting.
Because it is plaintext, every client's sums can be checked on their own and against the
others' (`StatisticsRound`); pooled inside SecAgg+ or HE they could not be.
"""

from __future__ import annotations

import math
from logging import WARNING

import keras
import numpy as np
from flwr.common import NDArrays, Scalar
from flwr.common.logger import log

from fl_app.data.types import DataError, DataSpec
from fl_app.ml.standardize import Standardization, from_moments, mean_variance
from fl_app.server.settings import MIN_REPLIES
from fl_app.wire import KEY_STANDARDIZATION, KEY_STATISTICS
from strategies.validation import claim_cap

STATISTICS_CONFIG: dict[str, Scalar] = {KEY_STATISTICS: True}  # the round's fit config


OUTLIER_FACTOR = 30.0  # a client's mean or std this many typical spreads out is dropped


class StatisticsRound:
    """The run's pooled standardization, learnt from the clients' sums for data of `spec`
    (the inputs' last axis; a regression target too).

    A reply is kept only if it could come from real data: the shapes a client sends, finite,
    a whole number of rows (at most `max_examples` when that is > 0) with the values per
    feature that many rows hold, and sums of squares no smaller than a sum's square over
    the count (Cauchy-Schwarz). Then each client's own means and standard deviations (from
    its sums) are compared with the others' (`outliers`): one whose mean of a feature lies
    more than `OUTLIER_FACTOR` typical spreads from the clients' median mean, or whose
    standard deviation is above that many typical spreads, is dropped (logged by its id):
    a plausible count with huge values cannot set the statistics. A client claiming more
    rows than `examples_cap_factor` x the lower median claim has its sums scaled down to
    the cap (its means kept), as the fit rounds cap claimed examples. Fewer than
    `min_replies` (at least `MIN_REPLIES`) kept replies fail the run (`DataError`) before
    training: pooled statistics of one or two clients are theirs. What this cannot catch is
    made-up values within the others' spread: like an update, a client's data is its own to
    report.
    """

    def __init__(self, spec: DataSpec, examples_cap_factor: float = 0.0,
                 max_examples: int = 0, min_replies: int = MIN_REPLIES) -> None:
        features = spec.input_shape[-1]
        targets = spec.num_targets if spec.task == "regression" else 0
        self.shapes = [(2,), (features,), (features,), (targets,), (targets,)]
        self.per_row = math.prod(spec.input_shape[:-1])  # values of a feature in one row
        self.examples_cap_factor = examples_cap_factor
        self.max_examples = max_examples
        self.min_replies = max(min_replies, MIN_REPLIES)
        self.standardization: Standardization | None = None
        self._config: dict[str, Scalar] = {}

    def _fits(self, sums: NDArrays) -> bool:
        """Whether a reply could be a client's sums of real data (see the class doc)."""
        if not (len(sums) == len(self.shapes)
                and all(np.shape(a) == shape for a, shape in zip(sums, self.shapes))
                and all(np.asarray(a).dtype.kind == "f" and np.isfinite(a).all()
                        for a in sums)):
            return False
        values, rows = (float(c) for c in sums[0])
        if not (rows >= 1 and rows.is_integer() and values == rows * self.per_row):
            return False
        if self.max_examples and rows > self.max_examples:
            return False
        for count, total, squares in ((values, sums[1], sums[2]), (rows, sums[3], sums[4])):
            if np.any(squares < np.square(total) / count * (1 - 1e-9)):
                return False
        return True

    def _capped(self, kept: list[NDArrays]) -> list[NDArrays]:
        """The replies with every claim above the examples cap scaled down to it."""
        cap = claim_cap([int(sums[0][1]) for sums in kept], self.examples_cap_factor)
        if cap is None:
            return kept
        return [sums if sums[0][1] <= cap else [a * (cap / sums[0][1]) for a in sums]
                for sums in kept]

    def add(self, replies: list[tuple[str, NDArrays]]) -> None:
        """Pool the replies (client id, sums); one not of the form clients send, or an
        outlier among the others (`outliers`), is dropped and logged by its client id only.
        Raises DataError when fewer than `min_replies` are kept."""
        kept: dict[str, NDArrays] = {}
        for cid, sums in replies:
            if self._fits(sums):
                kept[cid] = [np.asarray(a, np.float64) for a in sums]
            else:
                log(WARNING, "client %s: its statistics are not the sums of real data (%s "
                    "finite arrays of shapes %s, whole rows, squares >= sum^2/count); dropped",
                    cid, len(self.shapes), self.shapes)
        if len(kept) >= MIN_REPLIES:
            for cid in outliers(kept):
                log(WARNING, "client %s: its statistics' means or spreads lie more than %g "
                    "typical spreads from the other clients'; dropped", cid, OUTLIER_FACTOR)
                del kept[cid]
        if len(kept) < self.min_replies:
            raise DataError(f"standardize: {len(kept)} client(s) answered the statistics "
                            f"round with usable sums, fewer than {self.min_replies} (the "
                            "larger of min-fit-clients and 3): statistics pooled from so few "
                            "would be those clients' own; the run stops before training "
                            "(connect more clients or set standardize=false)")
        pooled = self._capped(list(kept.values()))
        self.standardization = from_moments([np.sum(arrays, axis=0) for arrays in zip(*pooled)])
        self._config = {KEY_STANDARDIZATION: self.standardization.to_bytes()}

    def config(self) -> dict[str, Scalar]:
        """What every later fit and evaluate config carries: the pooled statistics (their
        bytes made once, when they are pooled; nothing before)."""
        return self._config

    def final_model(self, model: keras.Model, input_shape: tuple[int, ...]) -> keras.Model:
        """The model as `final_model.keras` holds it: raw inputs in, raw-scale outputs out."""
        if self.standardization is None:
            return model
        return self.standardization.wrap(model, input_shape)


def _spreads(kept: dict[str, NDArrays]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per group (the features, a regression's targets; clients x values): each client's
    means and standard deviations, from its sums."""
    groups = []
    for count, total, squares in ((0, 1, 2), (1, 3, 4)):
        means, variances = zip(*(mean_variance(float(s[0][count]), s[total], s[squares])
                                 for s in kept.values()))
        groups.append((np.array(means), np.sqrt(variances)))
    return groups


def outliers(kept: dict[str, NDArrays]) -> list[str]:
    """The clients (of at least `MIN_REPLIES`) whose statistics are outliers against the
    others': per value (feature, target), the typical spread is the upper quartile (lower
    value) over the clients of the standard deviations and of the means' distances from
    their median, which one liar in four cannot move; a client whose mean lies more than
    `OUTLIER_FACTOR` typical spreads from the median, or whose standard deviation is above
    that many, is an outlier. A value with no typical spread (constant for three quarters of
    the clients) is not judged. The factor leaves honest label-skewed clients in: on digits
    split pathologically or by Dirichlet(0.1) over 5 to 100 clients no client came above
    18 typical spreads."""
    flagged = np.zeros(len(kept), bool)
    for means, stds in _spreads(kept):
        distance = np.abs(means - np.median(means, axis=0))
        spread = np.maximum(np.quantile(stds, 0.75, axis=0, method="lower"),
                            np.quantile(distance, 0.75, axis=0, method="lower"))
        limit = np.where(spread > 0, OUTLIER_FACTOR * spread, np.inf)
        flagged |= np.any((distance > limit) | (stds > limit), axis=1)
    return [cid for cid, out in zip(kept, flagged) if out]
