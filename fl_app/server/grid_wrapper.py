"""The base of the app's Grid wrappers (`PromptGrid`, `MeteredGrid`, `ReplyErrors`): each
overrides the calls it changes and hands every other attribute to the Grid it wraps."""

from __future__ import annotations

from typing import Any

from flwr.serverapp import Grid


class GridWrapper:
    """A Grid that delegates every attribute it does not define to `grid`."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)
