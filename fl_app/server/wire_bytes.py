"""Bytes on the wire per round, counted from the messages themselves.

`WireMeter` wraps the server's strategy (outermost, around any compression) and sums, for
every sampled client, the byte lengths of the `Parameters` tensors as Flower serializes
them: the `FitIns` each client is sent (down) and the `FitRes` each returns (up). Nothing
is estimated from shapes: a compressed message counts its codec's blobs, a plain one the
`.npy` bytes of each array.
"""

from __future__ import annotations

from flwr.common import FitIns, FitRes, Parameters, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from strategies.wrapper import StrategyWrapper


def parameters_bytes(parameters: Parameters) -> int:
    """The bytes of a `Parameters`' serialized tensors."""
    return sum(len(tensor) for tensor in parameters.tensors)


class WireMeter(StrategyWrapper):
    """Counts the training messages' parameter bytes; `take()` returns and resets them."""

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self.up = self.down = 0

    def __repr__(self) -> str:
        return repr(self.inner)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Delegate, then count what each sampled client is sent."""
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        self.down += sum(parameters_bytes(ins.parameters) for _, ins in instructions)
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Count what each answering client sent, then delegate."""
        self.up += sum(parameters_bytes(res.parameters) for _, res in results)
        return self.inner.aggregate_fit(server_round, results, failures)

    def take(self) -> dict[str, int]:
        """The bytes counted since the last call, {"up": ..., "down": ...}; resets them."""
        counted = {"up": self.up, "down": self.down}
        self.up = self.down = 0
        return counted
