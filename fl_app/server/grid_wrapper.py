"""The base of the app's Grid wrappers (`PromptGrid`, `MeteredGrid`, `ReplyErrors`): each
overrides the calls it changes and hands every other one to the Grid it wraps."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fl_app.flower_internals import Run


class GridWrapper(Grid):
    """A Flower `Grid` that delegates to `grid`: Grid's calls by name, so it is a Grid
    wherever one is expected, and any other attribute through `__getattr__`."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    @property
    def run(self) -> Run:
        """The wrapped grid's run."""
        return self.grid.run

    def set_run(self, run: Run) -> None:
        """Set the wrapped grid's run."""
        self.grid.set_run(run)

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        """The wrapped grid's message."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """The wrapped grid's node ids."""
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[Any]:
        """The wrapped grid's nodes (Flower's `NodeInfo`s)."""
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push through the wrapped grid."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull through the wrapped grid."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Send and receive through the wrapped grid."""
        return self.grid.send_and_receive(messages, timeout=timeout)
