"""How much local work a node does: per-node overrides of the round's epochs and batch size,
a time budget, and heterogeneous epochs drawn per client for experiments.

A SuperNode states its own work in its node-config (`--node-config "local-epochs=2
batch-size=8 time-budget=1.5"`), which wins over the round's config: a slow device trains
fewer epochs, a fast one more. `time-budget` (seconds) trains until it runs out, checked at
step granularity, at most `local-epochs` epochs if the node sets that too (else no epoch
cap). In simulation every partition can get its own node-config through `sim-node-config`,
and `local-epochs-range = "1-10"` gives each client a fixed number of local epochs drawn
from that range, seeded by `seed` and its partition id (the FedNova paper's heterogeneous
local work). A server-chosen straggler's `straggler-epochs` (fit config, see
`strategies.stragglers`) wins over all of them. Clients report the steps they took as
`local_steps` in their fit metrics (FedNova's tau). `round-time-budget` makes every node
size its own work to a per-round time budget from its measured speed
(`fl_app.client.adaptive_work`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from flwr.common import Scalar as MessageValue

from fl_app.schema import ConfigError, LayerSettings, Scalar, Setting
from fl_app.wire import KEY_STRAGGLER_EPOCHS

WORK_KEYS = ("local-epochs", "batch-size", "time-budget")  # node-config keys read here
_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")
_RANGE_SALT = 0x10CA1E


def parse_epochs_range(text: str) -> tuple[int, int] | None:
    """`"1-10"` as (1, 10); None for an empty string; ConfigError otherwise."""
    if not text.strip():
        return None
    match = _RANGE.match(text)
    low, high = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    if not match or not 1 <= low <= high:
        raise ConfigError(f"run-config key 'local-epochs-range' must look like '1-10' "
                          f"(1 <= low <= high), got {text!r}")
    return low, high


def parse_sim_node_config(text: str) -> dict[int, dict[str, Scalar]]:
    """`"0: local-epochs=2 batch-size=8; 3: time-budget=1.5"` as {partition: node-config};
    ConfigError naming the part at fault."""
    from fl_app.flower_internals import parse_config_args

    nodes: dict[int, dict[str, Scalar]] = {}
    for part in filter(str.strip, text.split(";")):
        pid, sep, pairs = part.partition(":")
        if not sep or not pid.strip().isdigit():
            raise ConfigError(f"run-config key 'sim-node-config': {part.strip()!r} must look "
                              "like '<partition-id>: key=value ...'")
        try:
            values = parse_config_args([pairs.strip()]) if pairs.strip() else {}
        except Exception as err:  # click/TOML errors of many kinds
            raise ConfigError(f"run-config key 'sim-node-config': {part.strip()!r} cannot be "
                              f"parsed: {err}") from err
        where = f"run-config key 'sim-node-config' for partition {pid.strip()}"
        unknown = sorted(set(values) - set(WORK_KEYS))
        if unknown:
            raise ConfigError(f"{where}: {', '.join(map(repr, unknown))} cannot be set here "
                              f"(only {', '.join(WORK_KEYS)})")
        node_work(values, where)
        nodes[int(pid)] = values
    return nodes


def _checked(value: Scalar, key: str, where: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if not ok or (key != "time-budget" and not float(value).is_integer()):
        kind = "a positive number of seconds" if key == "time-budget" else "a positive integer"
        raise ConfigError(f"{where}: {key!r} must be {kind}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class NodeWork:
    """A node's own local work, overriding the round's config where set.

    Args:
        epochs: local epochs (None: the round's).
        batch_size: local batch size (None: the round's).
        time_budget: seconds of training per fit (None: no budget).
    """

    epochs: int | None = None
    batch_size: int | None = None
    time_budget: float | None = None

    def plan(self, config: Mapping[str, MessageValue],
             defaults: Mapping[str, MessageValue]) -> tuple[int | None, int, float | None]:
        """(epochs, batch size, time budget) for one fit with the round's `config`
        (falling back to `defaults`, the run config). Epochs are None under a time budget
        without an epoch cap."""
        batch = self.batch_size or int(config.get("batch-size", defaults["batch-size"]))
        if KEY_STRAGGLER_EPOCHS in config:
            return int(config[KEY_STRAGGLER_EPOCHS]), batch, self.time_budget
        if self.time_budget:
            return self.epochs, batch, self.time_budget
        epochs = self.epochs or int(config.get("local-epochs", defaults["local-epochs"]))
        return epochs, batch, None


def node_work(node_config: Mapping[str, Scalar], where: str) -> NodeWork:
    """The work keys of a node-config as a `NodeWork`; ConfigError naming `where` and the key."""
    values = {key: _checked(node_config[key], key, where)
              for key in WORK_KEYS if key in node_config}
    return NodeWork(epochs=int(values["local-epochs"]) if "local-epochs" in values else None,
                    batch_size=int(values["batch-size"]) if "batch-size" in values else None,
                    time_budget=values.get("time-budget"))


@dataclass(frozen=True)
class WorkSettings(LayerSettings):
    """The run-config keys a node's local work comes from (`SETTINGS`: the round's time
    budget, the epochs range, the simulation's per-node work, and the run's seed): built
    once by the app layer (`WorkSettings.from_config(cfg)`)."""

    round_time_budget: float
    local_epochs_range: str
    sim_node_config: str
    seed: int


def drawn_epochs(settings: WorkSettings, client_key: int) -> int | None:
    """This client's fixed epochs from `local-epochs-range` (None when it is unset)."""
    bounds = parse_epochs_range(settings.local_epochs_range)
    if bounds is None:
        return None
    rng = np.random.default_rng([settings.seed, _RANGE_SALT, client_key])
    return int(rng.integers(bounds[0], bounds[1] + 1))


def work_for(settings: WorkSettings, node_config: Mapping[str, Scalar], client_key: int,
             where: str) -> NodeWork:
    """A node's work: its node-config's keys (in simulation also its `sim-node-config`
    entry), with `local-epochs-range`'s draw where it sets no epochs of its own."""
    merged = dict(node_config)
    if "partition-id" in node_config:
        merged.update(parse_sim_node_config(settings.sim_node_config).get(
            int(node_config["partition-id"]), {}))
    work = node_work(merged, where)
    if work.epochs is None:
        work = NodeWork(drawn_epochs(settings, client_key), work.batch_size, work.time_budget)
    return work


def check_config(values: Mapping[str, Scalar]) -> None:
    """Refuse a malformed `local-epochs-range` or `sim-node-config`, and a
    `round-time-budget` next to another key that sets the work, before any training."""
    parse_epochs_range(str(values["local-epochs-range"]))
    parse_sim_node_config(str(values["sim-node-config"]))
    if values["round-time-budget"]:
        clashes = [f"{key!r}" for key in ("local-epochs-range", "straggler-fraction")
                   if values[key]]
        if clashes:
            raise ConfigError(f"run-config key 'round-time-budget' lets each node size its own "
                              f"work, which {' and '.join(clashes)} would set too: use one")


SETTINGS = [
    Setting("round-time-budget", float, 0.0,
            "Adaptive local work: seconds of local training per round. Each node measures "
            "its speed on its first fit, then picks its batch size (b/4 .. 4b, the learning "
            "rate scaled with it) and steps to fill the budget; a node's own time-budget "
            "wins (0: off, every node trains local-epochs).", "training", low=0.0),
    Setting("local-epochs-range", str, "",
            "Heterogeneous local work: each client trains a fixed number of local epochs "
            "drawn from 'low-high' (e.g. '1-10'), seeded by seed and its partition id "
            "(empty: every client trains local-epochs).", "training"),
    Setting("sim-node-config", str, "",
            "Simulation: node-config per partition, as a SuperNode's --node-config would set "
            "it: '0: local-epochs=2 batch-size=8; 3: time-budget=1.5' (keys local-epochs, "
            "batch-size, time-budget).", "training"),
]
