"""When a run ends early: Keras-EarlyStopping-like rules checked after every round."""

from __future__ import annotations

from typing import Any

IDLE_STOP = "no-client-updates"  # history's "stopped" when `max-idle-rounds` ends a run


class StoppingRules:
    """Ends a run early: target accuracy reached, `patience` rounds without improvement, or
    `max_idle_rounds` rounds in a row in which no client update was accepted."""

    def __init__(self, target_accuracy: float, patience: int, max_idle_rounds: int = 0) -> None:
        self.target_accuracy = target_accuracy
        self.patience = patience
        self.max_idle_rounds = max_idle_rounds
        self.best = float("-inf")
        self.rounds_since_best = 0
        self.idle_rounds = 0

    def after_round(self, accuracy: float | None, accepted_updates: int = 1) -> str | None:
        """Record a round's centralized accuracy and how many client updates it accepted;
        return why to stop, or None."""
        self.idle_rounds = 0 if accepted_updates else self.idle_rounds + 1
        if self.max_idle_rounds and self.idle_rounds >= self.max_idle_rounds:
            return IDLE_STOP
        if accuracy is None:
            return None
        if accuracy > self.best:
            self.best, self.rounds_since_best = accuracy, 0
        else:
            self.rounds_since_best += 1
        if self.target_accuracy and accuracy >= self.target_accuracy:
            return "target-accuracy"
        if self.patience and self.rounds_since_best >= self.patience:
            return "patience"
        return None

    def get_state(self) -> dict[str, Any]:
        """Best accuracy so far, rounds since, and idle rounds in a row (for checkpoints)."""
        return {"best": None if self.best == float("-inf") else self.best,
                "rounds_since_best": self.rounds_since_best, "idle_rounds": self.idle_rounds}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore `get_state`'s output."""
        self.best = float("-inf") if state["best"] is None else float(state["best"])
        self.rounds_since_best = int(state["rounds_since_best"])
        self.idle_rounds = int(state.get("idle_rounds", 0))  # absent in older checkpoints
