"""Flower's Grid, asked for replies every few tens of milliseconds instead of every 3 seconds.

In a deployment, Flower's compat client proxies send each instruction with
`Grid.send_and_receive`, whose `HttpGrid` implementation pulls the replies and then sleeps
3 s before it pulls again. A node that answers in 0.2 s is seen 3 s later, in every phase
of every round (fit, evaluate). `PromptGrid` keeps Flower's grid (its push and pull, its
messages, TLS and all) and only polls sooner: after 20 ms, then 1.5× longer each time up to
`max_interval` (0.25 s), so a quick reply is seen at once and a slow one costs a few pulls
per second per client, each a small local request to the SuperLink.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.common import Message
from flwr.server.client_proxy import ClientProxy
from flwr.serverapp import Grid

from fl_app.server.grid_wrapper import GridWrapper

FIRST_INTERVAL = 0.02
MAX_INTERVAL = 0.25


class PromptGrid(GridWrapper):
    """A Flower `Grid` whose `send_and_receive` polls for replies with a short back-off;
    every other attribute is the wrapped grid's."""

    def __init__(self, grid: Grid, first_interval: float = FIRST_INTERVAL,
                 max_interval: float = MAX_INTERVAL) -> None:
        super().__init__(grid)
        self.first_interval = first_interval
        self.max_interval = max_interval

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Push `messages`, then pull until every one has a reply or `timeout` (seconds,
        None: no limit) has passed; the replies that came, as Flower's grid returns them."""
        pending = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        interval = self.first_interval
        while pending:
            pulled = list(self.grid.pull_messages(pending))
            replies.extend(pulled)
            pending.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(interval)
            interval = min(interval * 1.5, self.max_interval)
        return replies


def prompt(proxy: ClientProxy) -> ClientProxy:
    """`proxy` with its grid (Flower's `GridClientProxy.grid`) wrapped in a `PromptGrid`;
    a proxy without one (a test double, another transport) is returned as it is."""
    grid = getattr(proxy, "grid", None)
    if grid is not None and not isinstance(grid, PromptGrid):
        proxy.grid = PromptGrid(grid)  # type: ignore[attr-defined]
    return proxy
