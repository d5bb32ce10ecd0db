"""FedBuff: buffered asynchronous aggregation (Nguyen et al., AISTATS 2022, "Federated
Learning with Buffered Asynchronous Aggregation").

Clients train on whichever model version they last received. Each update is the client's
weights minus that version, Δ_i = w_i − w^(τ_i). The server buffers updates and, once it
holds K = `fedbuff-buffer-size` of them, makes the next version

    w^(t+1) = w^(t) + η · Σ_i n_i · g(s_i) · Δ_i / Σ_i n_i,    g(s) = (1 + s)^(−a)

with staleness s_i = t − τ_i (versions made since the client's), n_i its examples,
a = `fedbuff-staleness-exponent` (the paper's 1/√(1+s): a = 0.5) and η =
`fedbuff-server-lr`. The sum is normalised by Σ n_i, not Σ n_i·g(s_i), so staleness
shrinks a step instead of only reweighting it, as the paper's 1/K. An update staler than
`fedbuff-max-staleness` is rejected (logged, counted), as is one that fails the checks of
`strategies.validation`. With every client in one buffer, no staleness and η = 1 the step
is exactly weighted FedAvg (the paper averages uniformly; weighting by examples keeps the
app's FedAvg objective).

`FedBuffAggregator` is the server's state: the current version and its weights, and the
buffer. The loop that keeps clients busy is `fl_app.server.fedbuff_loop`.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

import numpy as np
from flwr.common import NDArrays, Scalar
from flwr.common.logger import log

from fl_app.protocol.clipping import model_update
from fl_app.schema import ConfigError, Setting
from strategies.metrics import weighted_metrics
from strategies.validation import update_problem

FEDBUFF = "fedbuff"

SETTINGS = [
    Setting("fedbuff-buffer-size", int, 5,
            "FedBuff (server-loop='fedbuff'): updates K buffered per new model version.",
            "strategy", low=1),
    Setting("fedbuff-concurrency", int, 0,
            "FedBuff: clients training at once (0: every connected client).", "strategy",
            low=0),
    Setting("fedbuff-max-staleness", int, 20,
            "FedBuff: reject an update whose staleness (versions made since the model it "
            "trained from) exceeds this.", "strategy", low=0),
    Setting("fedbuff-server-lr", float, 1.0, "FedBuff: server learning rate η.", "strategy",
            low=0.0, low_open=True),
    Setting("fedbuff-staleness-exponent", float, 0.5,
            "FedBuff: an update of staleness s is weighted (1+s)^-a (0.5: the paper's "
            "1/sqrt(1+s); 0: no discount).", "strategy", low=0.0),
]


def check_config(values: Mapping[str, Scalar]) -> None:
    """Refuse FedBuff with a key whose guarantee needs a synchronous round (the strategy is
    refused by its spec: `strategies.combinations.refuse_fedbuff`)."""
    if values["server-loop"] != FEDBUFF:
        return
    for key, off in (("homomorphic-encryption", "none"), ("secure-aggregation", "none"),
                     ("compress-up", "none"), ("compress-down", "none"),
                     ("prune-sparsity", 0.0)):
        if key in values and values[key] != off:
            raise ConfigError(f"run-config keys 'server-loop'='fedbuff' and {key!r}="
                              f"{values[key]!r} cannot be combined: FedBuff's loop sends and "
                              f"reads plain updates, outside the strategy that would encrypt, "
                              f"mask, encode, decode or prune them; set {key}={off!r}")
    if values["straggler-fraction"]:
        raise ConfigError("run-config keys 'server-loop'='fedbuff' and 'straggler-fraction' "
                          "cannot be combined: FedProx-style stragglers are drawn from a "
                          "synchronous round's cohort; simulate slow clients under FedBuff "
                          "with slow-client-fraction and slow-client-slowdown")
    if values["outlier-norm-factor"]:
        raise ConfigError("run-config keys 'server-loop'='fedbuff' and 'outlier-norm-factor' "
                          "cannot be combined: the outlier check compares the updates of one "
                          "synchronous round; set outlier-norm-factor=0")
    if str(values["monitor"]).startswith("distributed_"):
        raise ConfigError(f"run-config keys 'server-loop'='fedbuff' and 'monitor'="
                          f"{values['monitor']!r} cannot be combined: FedBuff runs no "
                          "distributed evaluation; monitor a centralized metric")


def staleness_weight(staleness: int, exponent: float) -> float:
    """g(s) = (1 + s)^(−exponent): the factor an update of staleness `s` is scaled by."""
    if staleness < 0:
        raise ValueError(f"staleness must be >= 0, got {staleness}")
    return float((1.0 + staleness) ** -exponent)


@dataclass
class BufferedUpdate:
    """One accepted update waiting in the buffer."""

    delta: NDArrays
    num_examples: int
    staleness: int
    metrics: dict[str, Scalar]


@dataclass
class Arrival:
    """What became of one client's update: accepted (`problem` None) or why not."""

    staleness: int
    problem: str | None = None


@dataclass
class Step:
    """One new model version: what went into it."""

    version: int
    num_updates: int
    staleness: list[int] = field(default_factory=list)
    num_capped: int = 0
    metrics: dict[str, Scalar] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The version's fit statistics for history.json."""
        return {**self.metrics, "staleness_mean": float(np.mean(self.staleness)),
                "staleness_max": int(max(self.staleness)), "num_capped": self.num_capped}


class FedBuffAggregator:
    """The FedBuff server state: the current model version, its weights and the buffer.

    Args:
        weights: the model the run starts from (version `version`).
        buffer_size: K, updates per new version.
        max_staleness: updates staler than this are rejected.
        server_lr: η, the server learning rate.
        staleness_exponent: a in g(s) = (1 + s)^(−a).
        max_examples: reject updates claiming more examples (0: no cap).
        examples_cap_factor: cap claims at this factor times the buffer's lower median
            claim when a version is made (0: off), as `strategies.validation.cap_claims`.
        version: the version number of `weights` (a resumed run's).

    Example:
        agg = FedBuffAggregator(w0, buffer_size=3, max_staleness=10, server_lr=1.0,
                                staleness_exponent=0.5)
        agg.add(client_weights, 120, base_version=0, base_weights=w0)
        if agg.ready():
            step = agg.apply()
    """

    def __init__(self, weights: NDArrays, *, buffer_size: int, max_staleness: int,
                 server_lr: float, staleness_exponent: float, max_examples: int = 0,
                 examples_cap_factor: float = 0.0, version: int = 0) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        self.weights = [np.asarray(w) for w in weights]
        self.version = version
        self.buffer_size = buffer_size
        self.max_staleness = max_staleness
        self.server_lr = server_lr
        self.staleness_exponent = staleness_exponent
        self.max_examples = max_examples
        self.examples_cap_factor = examples_cap_factor
        self.buffer: list[BufferedUpdate] = []

    def add(self, arrays: NDArrays, num_examples: int, *, base_version: int,
            base_weights: NDArrays, metrics: Mapping[str, Scalar] | None = None) -> Arrival:
        """Buffer a client's `arrays`, trained from version `base_version` (whose weights
        are `base_weights`), unless it is too stale or invalid."""
        staleness = self.version - base_version
        if staleness > self.max_staleness:
            return Arrival(staleness, f"staleness {staleness} exceeds fedbuff-max-staleness="
                                      f"{self.max_staleness}")
        problem = update_problem(arrays, num_examples, self.weights, self.max_examples)
        if problem is not None:
            return Arrival(staleness, problem)
        self.buffer.append(BufferedUpdate(model_update(arrays, base_weights), int(num_examples),
                                          staleness, dict(metrics or {})))
        return Arrival(staleness)

    def ready(self) -> bool:
        """Whether the buffer holds K updates."""
        return len(self.buffer) >= self.buffer_size

    def _capped_examples(self) -> tuple[list[int], int]:
        claims = [u.num_examples for u in self.buffer]
        if not self.examples_cap_factor:
            return claims, 0
        cap = max(1, int(self.examples_cap_factor * statistics.median_low(claims)))
        capped = sum(1 for n in claims if n > cap)
        if capped:
            log(WARNING, "version %s: %s update(s) claim more than %s examples, capped "
                "(examples-cap-factor=%g x the buffer's median claim)", self.version + 1, capped,
                cap, self.examples_cap_factor)
        return [min(n, cap) for n in claims], capped

    def apply(self) -> Step:
        """Make the next version from the buffered updates and empty the buffer."""
        if not self.buffer:
            raise RuntimeError("FedBuff: apply() with an empty buffer")
        examples, capped = self._capped_examples()
        total = float(sum(examples))
        coefficients = [self.server_lr * n * staleness_weight(u.staleness,
                                                              self.staleness_exponent) / total
                        for n, u in zip(examples, self.buffer)]
        self.weights = [
            (np.asarray(w, dtype=np.float64)
             + sum(c * u.delta[i] for c, u in zip(coefficients, self.buffer))).astype(w.dtype)
            for i, w in enumerate(self.weights)]
        self.version += 1
        step = Step(self.version, len(self.buffer), [u.staleness for u in self.buffer], capped,
                    weighted_metrics((n, u.metrics) for n, u in zip(examples, self.buffer)))
        self.buffer = []
        return step
