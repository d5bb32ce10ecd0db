"""The base of the client wrappers (faults, stragglers, timings): every call goes to `inner`."""

from __future__ import annotations

from typing import Any

from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar


class DelegatingClient(NumPyClient):
    """A NumPyClient that passes every call, and every attribute it lacks, to `inner`;
    a wrapper overrides only what it changes."""

    def __init__(self, inner: NumPyClient) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        # Attributes particular to the wrapped client (a KerasClient's data, trainer).
        return getattr(self.__dict__["inner"], name)

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """The wrapped client's properties."""
        return self.inner.get_properties(config)

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        """The wrapped client's weights."""
        return self.inner.get_parameters(config)

    def fit(self, parameters: NDArrays,
            config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """The wrapped client's fit."""
        return self.inner.fit(parameters, config)

    def evaluate(self, parameters: NDArrays,
                 config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        """The wrapped client's evaluate."""
        return self.inner.evaluate(parameters, config)
