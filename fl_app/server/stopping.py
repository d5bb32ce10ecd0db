"""When a run ends early: rules like Keras' `EarlyStopping`, checked after every round.

The monitored value comes from the round record: a centralized metric by its Keras name
(`loss`, `accuracy`, `mae`, ...) or `distributed_<name>` for the clients' validation
average. As in Keras, `mode` "auto" minimizes names ending in `loss`, asks the metric's
direction (`directions`, from the compiled metric objects' `_direction`) otherwise, and
falls back to the metric's name when no direction is known.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from fl_app.schema import ConfigError, did_you_mean

IDLE_STOP = "no-client-updates"  # history's "stopped" when `max-idle-rounds` ends a run
DISTRIBUTED = "distributed_"  # monitor prefix for the clients' validation average
# Parts of names of metrics that grow as the model gets better (Keras' "up" metrics).
_UP_NAME_PARTS = ("acc", "auc", "precision", "recall", "f1", "fbeta", "iou", "io_u", "r2",
                  "correlation", "cosine_similarity", "sensitivity", "specificity")


def resolve_monitor(monitor: str, metric_names: Iterable[str]) -> str:
    """`monitor` itself, or for "auto": `accuracy` when `metric_names` (the centralized
    evaluation's names) has it, else `loss`."""
    if monitor != "auto":
        return monitor
    return "accuracy" if "accuracy" in set(metric_names) else "loss"


def resolve_mode(monitor: str, mode: str, directions: Mapping[str, str] | None = None) -> str:
    """Return "min" or "max" for a resolved monitor: `mode` itself unless it is "auto"."""
    if mode != "auto":
        return mode
    name = monitor.removeprefix(DISTRIBUTED)
    if name.endswith("loss"):
        return "min"
    if directions and name in directions:
        return "max" if directions[name] == "up" else "min"
    return "max" if any(part in name for part in _UP_NAME_PARTS) else "min"


def check_monitor(monitor: str, metric_names: Iterable[str]) -> None:
    """Raise ConfigError unless `monitor` is "auto", one of `metric_names` (the centralized
    evaluation's Keras names, `loss` included) or `distributed_<one of them>`."""
    names = sorted(set(metric_names))
    available = names + [DISTRIBUTED + name for name in names]
    if monitor == "auto" or monitor in available:
        return
    raise ConfigError(f"run-config key 'monitor' has unknown metric {monitor!r}; available: "
                      f"'auto', {', '.join(repr(n) for n in available)}"
                      f"{did_you_mean(monitor, available)}")


class StoppingRules:
    """Ends a run early, like Keras' `EarlyStopping`: the monitored value reaches `target`,
    `patience` rounds pass without an improvement larger than `min_delta`, or
    `max_idle_rounds` rounds in a row accept no client update. 0 disables each rule.

    `monitor` and `mode` are resolved once, from `metric_names` (the centralized
    evaluation's names) and `directions` (metric name -> "up"/"down"); see
    `resolve_monitor` and `resolve_mode`.
    """

    def __init__(self, monitor: str = "auto", mode: str = "auto", *, patience: int = 0,
                 min_delta: float = 0.0, target: float = 0.0, max_idle_rounds: int = 0,
                 metric_names: Iterable[str] = (),
                 directions: Mapping[str, str] | None = None) -> None:
        self.monitor = resolve_monitor(monitor, metric_names)
        self.mode = resolve_mode(self.monitor, mode, directions)
        self.patience = patience
        self.min_delta = abs(min_delta)
        self.target = target
        self.max_idle_rounds = max_idle_rounds
        self.best = self._no_best()
        self.rounds_since_best = 0
        self.idle_rounds = 0

    def _no_best(self) -> float:
        return -math.inf if self.mode == "max" else math.inf

    def value(self, record: Mapping[str, Any]) -> float | None:
        """The monitored value in a round record, or None when the round has none."""
        section, name = "centralized", self.monitor
        if name.startswith(DISTRIBUTED):
            section, name = "distributed", name.removeprefix(DISTRIBUTED)
        value = (record.get(section) or {}).get(name)
        return None if value is None else float(value)

    def _improves(self, value: float) -> bool:
        if self.mode == "max":
            return value - self.min_delta > self.best
        return value + self.min_delta < self.best

    def _reaches_target(self, value: float) -> bool:
        if not self.target:
            return False
        return value >= self.target if self.mode == "max" else value <= self.target

    def after_round(self, record: Mapping[str, Any], accepted_updates: int = 1) -> str | None:
        """Record a round (its record and how many client updates it accepted); return why
        to stop ("target", "patience" or `IDLE_STOP`), or None. A round without the
        monitored value counts neither as an improvement nor towards `patience`."""
        self.idle_rounds = 0 if accepted_updates else self.idle_rounds + 1
        if self.max_idle_rounds and self.idle_rounds >= self.max_idle_rounds:
            return IDLE_STOP
        value = self.value(record)
        if value is None:
            return None
        if self._improves(value):
            self.best, self.rounds_since_best = value, 0
        else:
            self.rounds_since_best += 1
        if self._reaches_target(value):
            return "target"
        if self.patience and self.rounds_since_best >= self.patience:
            return "patience"
        return None

    def get_state(self) -> dict[str, Any]:
        """Best value so far (None before the first finite one), rounds since, and idle
        rounds in a row (for checkpoints, which are JSON: no infinities)."""
        return {"best": self.best if math.isfinite(self.best) else None,
                "rounds_since_best": self.rounds_since_best, "idle_rounds": self.idle_rounds}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Restore `get_state`'s output."""
        self.best = self._no_best() if state["best"] is None else float(state["best"])
        self.rounds_since_best = int(state["rounds_since_best"])
        self.idle_rounds = int(state.get("idle_rounds", 0))  # absent in older checkpoints
