"""Bytes on the wire of a SecAgg+ round, counted at the Grid (a plaintext round's are
counted by the strategy chain's `strategies.wire_meter.WireMeter`).

Under SecAgg+ the strategy sees only the unmasked aggregate, so `MeteredGrid` counts that
round's traffic at the Grid instead: the records (arrays, configs, metrics) of every fit
message pushed and every reply pulled, all four of the protocol's stages included, and
those `ByteCounts` become the round's figures.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fl_app.server.grid_wrapper import GridWrapper
from strategies.wire_meter import ByteCounts


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
