"""PromptGrid: replies are pulled with a short back-off instead of Flower's 3 s sleep.

The real grid (Flower's HttpGrid to a SuperLink) is exercised by tests/test_deployment.py;
here a scripted grid counts the pulls and times the polling.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

from flwr.server.compat.grid_client_proxy import GridClientProxy

from fl_app.server.client_manager import SeededClientManager
from fl_app.server.prompt_grid import PromptGrid, prompt
from fl_app.server.round_record import mean_timing
from tests.flower_objects import fit_res


class ScriptedGrid:
    """Replies to message i become available `ready_after[i]` seconds after the push."""

    def __init__(self, ready_after: list[float]) -> None:
        self.ready_after = ready_after
        self.pushed_at = 0.0
        self.pulls = 0
        self.run_id = 7

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        self.pulls += 1
        now = time.monotonic() - self.pushed_at
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{i}"))
                for i, after in enumerate(self.ready_after)
                if f"m{i}" in set(message_ids) and now >= after]


def test_a_quick_reply_is_seen_at_once_not_after_flowers_3_seconds():
    grid = ScriptedGrid([0.05, 0.3])
    start = time.monotonic()
    replies = PromptGrid(grid).send_and_receive(["a", "b"])
    elapsed = time.monotonic() - start
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1"]
    assert 0.3 <= elapsed < 1.5, elapsed  # ~0.42 s by the back-off; Flower's HttpGrid: 3 s


def test_the_poll_backs_off_to_a_few_pulls_a_second():
    grid = ScriptedGrid([2.0])
    PromptGrid(grid).send_and_receive(["a"])
    # 20 ms growing 1.5x to 0.25 s: about 14 pulls in 2 s, not one every 20 ms (100)
    assert 8 <= grid.pulls <= 20, grid.pulls


def test_a_timeout_returns_the_replies_that_came():
    grid = ScriptedGrid([0.0, 60.0])
    start = time.monotonic()
    replies = PromptGrid(grid).send_and_receive(["a", "b"], timeout=0.5)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert time.monotonic() - start < 2.0  # the 0.5 s timeout, not the 60 s reply


def test_registered_grid_proxies_poll_promptly_and_are_wrapped_once():
    grid = ScriptedGrid([])
    proxy = GridClientProxy(node_id=5, grid=grid, run_id=7)
    manager = SeededClientManager(seed=0)
    assert manager.register(proxy)
    assert isinstance(proxy.grid, PromptGrid) and proxy.grid.grid is grid
    assert prompt(proxy).grid.grid is grid  # not wrapped twice
    assert proxy.grid.run_id == 7  # everything else is the wrapped grid's


def test_the_runner_records_the_clients_mean_seconds_per_phase():
    results = [(None, fit_res([], 10, {"time_data": 1.0, "time_training": 2.0, "loss": 0.5})),
               (None, fit_res([], 10, {"time_data": 3.0, "time_training": 4.0}))]
    assert mean_timing(res.metrics for _, res in results) == {"data": 2.0, "training": 3.0}
    assert mean_timing([fit_res([], 10, {"loss": 0.5}).metrics]) == {}
