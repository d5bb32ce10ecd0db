"""Adaptive local work: a node sizes each fit to a per-round time budget (`round-time-budget`).

The first time a node trains in a run it measures its own speed: optimizer steps at a
quarter of its batch size and at four times it, for at least 0.05 s each (after one untimed
step at each, so tracing is not counted; a one-step fit subtracted, so a fit's fixed cost
is not either),
fitted as seconds per step t(b) = a + c·b (a the fixed cost of a step, c the cost per
example). The probe's weights are thrown away. After every fit the line is rescaled half
way (geometrically) towards the seconds per step that fit took (a probe of a fraction of a
second on a busy machine is rough; a round's training less so). The line is kept in
the node's Flower `context.state` (`STATE_KEY`), which Flower keeps per node and run in
simulation and in deployment, so later rounds plan without measuring again. Every fit then
picks, from b/4, b/2, b, 2b and 4b (b: the node's batch size, at most its number of
examples), the batch b' that does the most examples within the budget in at least
`MIN_STEPS` steps (any b' if none reaches that), and as many steps as fit (the first fit
also pays for the probe, about 0.2 s of steps, and for tracing, as every node's first fit does). The
learning rate is scaled by b'/b for the call (Goyal
et al. 2017: linear scaling), the optimizer's own rate back after it (`KerasTrainer.forget`);
an optimizer on a LearningRateSchedule is not scaled (logged once). A slow node thus does
fewer, larger steps, a fast node more.

The fit reports its `local_steps`, `batch_size` and `lr_scale` (b'/b, 1 when the rate was
not scaled). FedNova takes tau = local_steps × lr_scale, the steps at the base rate the
update amounts to under linear scaling (`strategies.fednova`). A node's own `time-budget`
(node-config) wins over `round-time-budget`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from flwr.common import ConfigRecord, RecordDict

from fl_app.data.sources import Split
from fl_app.wire import MAX_LR_SCALE

if TYPE_CHECKING:
    from fl_app.ml.trainer import KerasTrainer

STATE_KEY = "adaptive-work"  # context.state: the node's measured step cost
PROBE_STEPS = 8  # timed steps per probed batch size, doubled until they take ...
PROBE_SECONDS = 0.05  # ... this long, or reach
MAX_PROBE_STEPS = 256
MIN_STEPS = 4  # prefer batch sizes that leave at least this many steps in the budget
SCALES = (1 / MAX_LR_SCALE, 0.5, 1.0, 2.0, MAX_LR_SCALE)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepCost:
    """Seconds per optimizer step at batch size b: `overhead` + `per_example` * b."""

    overhead: float
    per_example: float

    @classmethod
    def fitted(cls, small: tuple[int, float], large: tuple[int, float]) -> StepCost:
        """The line through two (batch size, seconds per step) points, both parts >= 0."""
        (b1, t1), (b2, t2) = small, large
        per_example = max((t2 - t1) / (b2 - b1), 0.0) if b2 != b1 else 0.0
        return cls(max(t1 - per_example * b1, 0.0), per_example)

    def seconds(self, batch: int) -> float:
        """Seconds per step at `batch` (never 0)."""
        return max(self.overhead + self.per_example * batch, 1e-9)

    def toward(self, batch: int, seconds: float) -> StepCost:
        """This line scaled half-way (geometrically) to pass through (`batch`, `seconds`
        per step): one fit slowed by something else (a retrace, a busy machine) moves
        the estimate only part of the way."""
        factor = math.sqrt(seconds / self.seconds(batch))
        return StepCost(self.overhead * factor, self.per_example * factor)


@dataclass(frozen=True)
class Plan:
    """One fit's adaptive work: batch size, optimizer steps and learning-rate factor."""

    batch_size: int
    steps: int
    lr_scale: float


def plan(cost: StepCost, budget: float, batch: int, num_examples: int) -> Plan:
    """The batch size and steps that do the most examples within `budget` seconds (see the
    module doc); `lr_scale` is b'/b against the batch the node would train otherwise."""
    base = max(1, min(batch, num_examples))
    options = []
    for size in sorted({min(math.ceil(base * scale), num_examples) for scale in SCALES}):
        steps = max(1, int(budget / cost.seconds(size)))
        options.append((steps * size, -abs(math.log(size / base)), size, steps))
    enough = [option for option in options if option[3] >= MIN_STEPS] or options
    _, _, size, steps = max(enough)
    return Plan(size, steps, size / base)


def _step_seconds(trainer: KerasTrainer, data: Split, size: int, slowdown: float) -> float:
    """Seconds per step at batch `size`: a fit of 1 + n steps less one of 1 step (the
    faster of two), over n, n doubling from `PROBE_STEPS` until the n steps take
    `PROBE_SECONDS` or n reaches `MAX_PROBE_STEPS` (what a fit costs once, not per step,
    cancels out; the clock's noise is small against what is timed)."""
    def timed(steps: int) -> float:
        return trainer.fit(data, epochs=None, steps=steps, batch_size=size,
                           slowdown=slowdown).seconds

    one, steps = min(timed(1), timed(1)), PROBE_STEPS
    while True:
        extra = timed(1 + steps) - one
        if extra >= PROBE_SECONDS or steps >= MAX_PROBE_STEPS:
            return max(extra / steps, 1e-6)
        steps *= 2


def measure(trainer: KerasTrainer, data: Split, batch: int, slowdown: float) -> StepCost:
    """Seconds per step at b/4 and 4b on `data` (`_step_seconds`, after an untimed step at
    each, so no tracing is timed), as a `StepCost`; the trainer's weights are left trained,
    for the caller to load its own."""
    base = max(1, min(batch, len(data)))
    sizes = (math.ceil(base / MAX_LR_SCALE), min(int(base * MAX_LR_SCALE), len(data)))
    for size in sizes:
        trainer.fit(data, epochs=None, steps=1, batch_size=size, slowdown=slowdown)
    small, large = ((size, _step_seconds(trainer, data, size, slowdown)) for size in sizes)
    return StepCost.fitted(small, large)


def _kept_float(record: ConfigRecord, key: str) -> float:
    """`record[key]`, a number `AdaptiveWork._keep` stored, as a float."""
    value = record[key]
    if isinstance(value, list):
        raise TypeError(f"context.state '{STATE_KEY}' holds a list under '{key}', not a number")
    return float(value)


@lru_cache(maxsize=8)
def _warn_schedule(model_name: str) -> None:
    log.info("round-time-budget: model %r's optimizer follows a learning-rate schedule, "
             "so its rate is not scaled with the batch size", model_name)


class AdaptiveWork:
    """A node's adaptive work for run-config `round-time-budget` (see the module doc);
    `state` is the node's `context.state`."""

    def __init__(self, budget: float, state: RecordDict) -> None:
        self.budget = budget
        self.state = state

    def cost(self) -> StepCost | None:
        """The step cost measured earlier in this run (None before the first fit)."""
        record = self.state.config_records.get(STATE_KEY)
        if record is None:
            return None
        return StepCost(_kept_float(record, "overhead"), _kept_float(record, "per-example"))

    def _keep(self, cost: StepCost) -> None:
        self.state.config_records[STATE_KEY] = ConfigRecord(
            {"overhead": cost.overhead, "per-example": cost.per_example})

    def choose(self, trainer: KerasTrainer, data: Split, batch: int,
               slowdown: float) -> Plan:
        """This fit's plan; on the node's first fit, after measuring its speed. Loads
        nothing: the caller sets the weights."""
        cost = self.cost()
        if cost is None:
            cost = measure(trainer, data, batch, slowdown)
            self._keep(cost)
        chosen = plan(cost, self.budget, batch, len(data))
        if trainer.base_learning_rate() is None and chosen.lr_scale != 1.0:
            _warn_schedule(trainer.model.name)
            return Plan(chosen.batch_size, chosen.steps, 1.0)
        return chosen

    def trained(self, chosen: Plan, seconds: float) -> None:
        """Rescale the kept step cost to what `chosen`'s fit took (`seconds`), so the next
        plan follows the node's speed as it is now."""
        cost = self.cost()
        if cost is not None and chosen.steps:
            self._keep(cost.toward(chosen.batch_size, seconds / chosen.steps))
