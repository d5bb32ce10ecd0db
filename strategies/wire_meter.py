"""Bytes on the wire per round, counted from the messages themselves: `WireMeter`, the
outermost layer of the server's strategy chain (`strategies.compose`).

It sums, for every sampled client, the byte lengths of the `Parameters` tensors as Flower
serializes them: the `FitIns` each client is sent (down) and the `FitRes` each returns (up;
in a round aggregated as its replies arrive, each reply as it is added: `CountedStream`).
Nothing is estimated from shapes: a compressed message counts its codec's blobs, a plain one
the `.npy` bytes of each array. (Under SecAgg+ the strategy sees only the unmasked
aggregate; `fl_app.server.wire_bytes.MeteredGrid` counts that round at the Grid.)
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.common import FitIns, FitRes, Parameters, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from strategies.protocols import FitStream, StreamsFit
from strategies.wrapper import StrategyWrapper


def parameters_bytes(parameters: Parameters) -> int:
    """The bytes of a `Parameters`' serialized tensors."""
    return sum(len(tensor) for tensor in parameters.tensors)


@dataclass
class ByteCounts:
    """Bytes sent to the clients (`down`) and received from them (`up`) since `take()`."""

    up: int = 0
    down: int = 0

    def take(self) -> dict[str, int]:
        """The bytes counted since the last call, {"up": ..., "down": ...}; resets them."""
        counted = {"up": self.up, "down": self.down}
        self.up = self.down = 0
        return counted


class WireMeter(StrategyWrapper):
    """Counts the training messages' parameter bytes in `counts`."""

    def __init__(self, inner: Strategy) -> None:
        super().__init__(inner)
        self.counts = ByteCounts()

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Delegate, then count what each sampled client is sent."""
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        self.counts.down += sum(parameters_bytes(ins.parameters) for _, ins in instructions)
        return instructions

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Count what each answering client sent, then delegate."""
        self.counts.up += sum(parameters_bytes(res.parameters) for _, res in results)
        return self.inner.aggregate_fit(server_round, results, failures)

    def open_fit_stream(self, server_round: int) -> FitStream | None:
        """The inner strategy's stream for this round (`StreamsFit`), counting each reply
        added; None when the inner strategy aggregates the round whole."""
        stream = (self.inner.open_fit_stream(server_round)
                  if isinstance(self.inner, StreamsFit) else None)
        return None if stream is None else CountedStream(stream, self.counts)

    def take(self) -> dict[str, int]:
        """The round's bytes (`ByteCounts.take`)."""
        return self.counts.take()


class CountedStream:
    """A `FitStream` that adds each reply's parameter bytes to `counts.up`."""

    def __init__(self, stream: FitStream, counts: ByteCounts) -> None:
        self.stream = stream
        self.counts = counts

    def add(self, proxy: ClientProxy, res: FitRes) -> None:
        """Count the reply's bytes, then pass it on."""
        self.counts.up += parameters_bytes(res.parameters)
        self.stream.add(proxy, res)

    def skip(self, proxy: ClientProxy) -> None:
        """Pass it on."""
        self.stream.skip(proxy)

    def finish(
        self, failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The inner stream's aggregate."""
        return self.stream.finish(failures)


def metered(strategy: Strategy) -> WireMeter:
    """`strategy` itself when it is a `WireMeter` (a `strategies.compose.compose` chain),
    else `strategy` behind a new one."""
    return strategy if isinstance(strategy, WireMeter) else WireMeter(strategy)
