"""The statistics round of `standardize=true`: before round 0 the server asks every connected
client for the sums of its training data and adds them up (`fl_app.ml.standardize`).

Only the pooled statistics leave the server, in every later fit and evaluate config and in
`final_model.keras` (its Normalization and Rescaling layers); no client's sums are
recorded or logged. The round is plaintext: the configuration refuses `standardize` with
secure aggregation, homomorphic encryption and DP (`fl_app.server.settings`), where the
server must not see one client's sums or their release is outside the privacy accounting.
"""

from __future__ import annotations

from logging import WARNING

import keras
import numpy as np
from flwr.common import NDArrays, Scalar
from flwr.common.logger import log

from fl_app.data.types import DataSpec
from fl_app.ml.standardize import Standardization, from_moments
from fl_app.wire import KEY_STANDARDIZATION, KEY_STATISTICS

STATISTICS_CONFIG: dict[str, Scalar] = {KEY_STATISTICS: True}  # the round's fit config


class StatisticsRound:
    """The run's pooled standardization, learnt from the clients' sums for data of `spec`
    (the inputs' last axis; a regression target too)."""

    def __init__(self, spec: DataSpec) -> None:
        features = spec.input_shape[-1]
        targets = spec.num_targets if spec.task == "regression" else 0
        self.shapes = [(2,), (features,), (features,), (targets,), (targets,)]
        self.standardization: Standardization | None = None

    def _fits(self, sums: NDArrays) -> bool:
        """Whether a reply has the arrays a client sends: the shapes, finite, counts >= 0."""
        return (len(sums) == len(self.shapes)
                and all(np.shape(a) == shape for a, shape in zip(sums, self.shapes))
                and all(np.isfinite(a).all() for a in sums) and bool(np.all(sums[0] >= 0)))

    def add(self, replies: list[tuple[str, NDArrays]]) -> None:
        """Pool the replies (client id, sums); one not of the form clients send is dropped
        and logged by its client id only. Raises RuntimeError when no reply is usable."""
        kept = []
        for cid, sums in replies:
            if self._fits(sums):
                kept.append([np.asarray(a, np.float64) for a in sums])
            else:
                log(WARNING, "client %s: its statistics are not %s finite arrays of shapes %s; "
                    "dropped", cid, len(self.shapes), self.shapes)
        if not kept or sum(s[0][1] for s in kept) == 0:
            raise RuntimeError("standardize: no client answered the statistics round with "
                               "data; the run cannot standardize")
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
