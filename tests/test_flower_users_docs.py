"""docs/flower-users.md's two examples run as written, on Flower's simulation engine:
our Keras ClientApp under Flower's stock FedAdam, and our strategies around a plain
NumPyClient; each must train."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DOC = Path(__file__).resolve().parents[1] / "docs" / "flower-users.md"


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)


def test_the_page_has_its_two_examples():
    assert len(_examples()) == 2


def test_our_clientapp_trains_under_flowers_fedadam():
    scope: dict = {"__name__": "flower_users_example"}
    exec(compile(_examples()[0], str(DOC), "exec"), scope)  # noqa: S102  (the doc's own code)
    rounds = scope["rounds"]
    assert len(rounds) == 3 and rounds[-1]["accuracy"] > 0.8, rounds


def test_our_strategies_train_a_plain_numpy_client():
    scope: dict = {"__name__": "flower_users_example"}
    exec(compile(_examples()[1], str(DOC), "exec"), scope)  # noqa: S102  (the doc's own code)
    accuracies = scope["accuracies"]
    assert len(accuracies) == 6  # round 0 and 5 rounds
    assert accuracies[0] < 0.2 and accuracies[-1] > 0.85, accuracies
