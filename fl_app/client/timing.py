"""Where one fit message's time went on the client, reported with its fit metrics.

Each phase is a fit metric `time_<phase>` in seconds (`fl_app.wire.TIMING_PREFIX`):
`process` (from the process's start until the app's code starts importing: Python,
Flower, the app bundle's installation, pulling the message), `imports` (the app's
modules, TensorFlow among them where this process trains), `data` (loading and checking
the node's data; 0 when the process has it loaded), `model` (building the trainer; 0 when
built) and `training` (the local fit). A process that serves many messages (a simulation
worker, a node executor's warm ClientApp) pays `process` and `imports` once: later messages report 0.
The server records the clients' mean per phase (`fit.timing` in history.json). Imports no
TensorFlow.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar

from fl_app.wire import TIMING_PREFIX

PHASES = ("process", "imports", "data", "model", "training")


class TimedClient(NumPyClient):
    """Delegates every call to `inner`; its fit metrics also carry `seconds` (phase →
    seconds) and the fit's own time as `training`, each unless `inner` already reports it
    (a client that measures its own phases)."""

    def __init__(self, inner: NumPyClient, seconds: Mapping[str, float]) -> None:
        self.inner = inner
        self.seconds = dict(seconds)

    def __getattr__(self, name: str) -> Any:
        # Attributes particular to the wrapped client (a KerasClient's data, trainer).
        return getattr(self.__dict__["inner"], name)

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """Delegate to the wrapped client."""
        return self.inner.get_properties(config)

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        """Delegate to the wrapped client."""
        return self.inner.get_parameters(config)

    def fit(self, parameters: NDArrays,
            config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """The wrapped client's fit, its metrics with the phases' seconds added."""
        start = time.perf_counter()
        weights, num_examples, metrics = self.inner.fit(parameters, config)
        seconds = {**self.seconds, "training": time.perf_counter() - start}
        timed = dict(metrics)
        for phase, value in seconds.items():
            timed.setdefault(f"{TIMING_PREFIX}{phase}", float(value))
        return weights, num_examples, timed

    def evaluate(self, parameters: NDArrays,
                 config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        """Delegate to the wrapped client."""
        return self.inner.evaluate(parameters, config)


def process_seconds(since: float) -> float:
    """Seconds from this process's start until `since` (a `time.time()`), or 0 if the
    process's start time cannot be read."""
    import psutil

    try:
        return max(0.0, since - psutil.Process().create_time())
    except psutil.Error:
        return 0.0
