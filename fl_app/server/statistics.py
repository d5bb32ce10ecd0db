"""The statistics round of `standardize=true`: before round 0 the server asks every connected
client for the sums of its training data and adds them up (`fl_app.ml.standardize`).

Only the pooled statistics leave the server, in every later fit and evaluate config and in
`final_model.keras` (its Normalization and Rescaling layers); no client's sums are
recorded or logged. The round is plaintext: the configuration refuses `standardize` with
secure aggregation, homomorphic encryption and DP (`fl_app.server.settings`), where the
server must not see one client's sums or their release is outside the privacy accounting.
"""

from __future__ import annotations

import math
from logging import WARNING

import keras
import numpy as np
from flwr.common import NDArrays, Scalar
from flwr.common.logger import log

from fl_app.data.types import DataSpec
from fl_app.ml.standardize import Standardization, from_moments
from fl_app.wire import KEY_STANDARDIZATION, KEY_STATISTICS
from strategies.validation import claim_cap

STATISTICS_CONFIG: dict[str, Scalar] = {KEY_STATISTICS: True}  # the round's fit config


class StatisticsRound:
    """The run's pooled standardization, learnt from the clients' sums for data of `spec`
    (the inputs' last axis; a regression target too).

    A reply is kept only if it could come from real data: the shapes a client sends, finite,
    a whole number of rows (at most `max_examples` when that is > 0) with the values per
    feature that many rows hold, and sums of squares no smaller than a sum's square over
    the count (Cauchy-Schwarz). A client claiming more rows than `examples_cap_factor` x
    the lower median claim has its sums scaled down to the cap (its means kept), as the fit
    rounds cap claimed examples. What this cannot catch is a plausible count with made-up
    values: like an update, a client's data is its own to report.
    """

    def __init__(self, spec: DataSpec, examples_cap_factor: float = 0.0,
                 max_examples: int = 0) -> None:
        features = spec.input_shape[-1]
        targets = spec.num_targets if spec.task == "regression" else 0
        self.shapes = [(2,), (features,), (features,), (targets,), (targets,)]
        self.per_row = math.prod(spec.input_shape[:-1])  # values of a feature in one row
        self.examples_cap_factor = examples_cap_factor
        self.max_examples = max_examples
        self.standardization: Standardization | None = None

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
        """Pool the replies (client id, sums); one not of the form clients send is dropped
        and logged by its client id only. Raises RuntimeError when no reply is usable."""
        kept = []
        for cid, sums in replies:
            if self._fits(sums):
                kept.append([np.asarray(a, np.float64) for a in sums])
            else:
                log(WARNING, "client %s: its statistics are not the sums of real data (%s "
                    "finite arrays of shapes %s, whole rows, squares >= sum^2/count); dropped",
                    cid, len(self.shapes), self.shapes)
        if not kept or sum(s[0][1] for s in kept) == 0:
            raise RuntimeError("standardize: no client answered the statistics round with "
                               "data; the run cannot standardize")
        kept = self._capped(kept)
        self.standardization = from_moments([np.sum(arrays, axis=0) for arrays in zip(*kept)])

    def config(self) -> dict[str, Scalar]:
        """What every later fit and evaluate config carries: the pooled statistics."""
        if self.standardization is None:
            return {}
        return {KEY_STANDARDIZATION: self.standardization.to_bytes()}

    def final_model(self, model: keras.Model, input_shape: tuple[int, ...]) -> keras.Model:
        """The model as `final_model.keras` holds it: raw inputs in, raw-scale outputs out."""
        if self.standardization is None:
            return model
        return self.standardization.wrap(model, input_shape)
