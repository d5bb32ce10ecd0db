"""The base of every NumPyClient that wraps another (fault injection, encryption, the fit
message's timing)."""

from __future__ import annotations

from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar


class ClientWrapper(NumPyClient):
    """Delegates every `NumPyClient` call to `inner`; subclasses override what they change."""

    def __init__(self, inner: NumPyClient) -> None:
        self.inner = inner

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """The inner client's properties."""
        return self.inner.get_properties(config)

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        """The inner client's weights."""
        return self.inner.get_parameters(config)

    def fit(self, parameters: NDArrays,
            config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Delegate to the inner client."""
        return self.inner.fit(parameters, config)

    def evaluate(self, parameters: NDArrays,
                 config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        """Delegate to the inner client."""
        return self.inner.evaluate(parameters, config)
