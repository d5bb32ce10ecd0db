"""Bytes on the wire per round, counted from the messages themselves.

`WireMeter` wraps the server's strategy (outermost, around any compression) and sums, for
every sampled client, the byte lengths of the `Parameters` tensors as Flower serializes
them: the `FitIns` each client is sent (down) and the `FitRes` each returns (up; in a round
aggregated as its replies arrive, each reply as it is added: `CountedStream`). Nothing
is estimated from shapes: a compressed message counts its codec's blobs, a plain one the
`.npy` bytes of each array.

Under SecAgg+ the strategy sees only the unmasked aggregate, so `MeteredGrid` counts that
round's traffic at the Grid instead: the records (arrays, configs, metrics) of every fit
message pushed and every reply pulled, all four of the protocol's stages included, and
those `ByteCounts` become the round's figures.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.serverapp import Grid

from fl_app.server.grid_wrapper import GridWrapper
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

    def __repr__(self) -> str:
        return repr(self.inner)

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


def value_bytes(value: Any) -> int:
    """The payload bytes of a config or metric value: strings and bytes by length, numbers
    8 (as protobuf carries them), booleans 1, lists element by element."""
    if isinstance(value, list):
        return sum(value_bytes(v) for v in value)
    if isinstance(value, bool):
        return 1
    return len(value) if isinstance(value, (str, bytes)) else 8


def record_bytes(content: RecordDict) -> int:
    """The bytes of a message's records: arrays (data), configs and metrics (keys and
    values)."""
    arrays = sum(record.count_bytes() for record in content.array_records.values())
    return arrays + sum(len(key) + value_bytes(value) for records in (
        content.config_records, content.metric_records)
        for record in records.values() for key, value in record.items())


class MeteredGrid(GridWrapper):
    """A Grid that counts the bytes of the fit messages pushed and the replies pulled
    (the app's `PromptGrid` sends and receives through these two calls)."""

    def __init__(self, grid: Grid) -> None:
        super().__init__(grid)
        self.counts = ByteCounts()
        self._fit_ids: set[str] = set()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push to the real Grid, counting fit messages."""
        messages = list(messages)
        ids = list(self.grid.push_messages(messages))
        pushed = set(ids)  # a grid may skip a message it could not store
        for message in messages:
            if message.metadata.message_type == MessageType.TRAIN \
                    and message.metadata.message_id in pushed:
                self.counts.down += record_bytes(message.content)
                self._fit_ids.add(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull from the real Grid, counting replies to fit messages."""
        replies = list(self.grid.pull_messages(message_ids))
        for reply in replies:
            if reply.metadata.reply_to_message_id in self._fit_ids:
                self._fit_ids.discard(reply.metadata.reply_to_message_id)
                if reply.has_content():
                    self.counts.up += record_bytes(reply.content)
        return replies
