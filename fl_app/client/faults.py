"""Fault injection and attacks for simulation: clients that misbehave on purpose.

Each simulated client gets at most one role, fixed for the whole run and derived only from
the run's `seed` and the client's partition id: the partition ids are shuffled with the
seed and the first ones become, in this order, clients that raise, stall, return NaN,
return garbage, then attackers (`attack-fraction` of `attack`), then stragglers
(`slow-client-fraction`); counts are the fractions of the number of partitions, rounded half
up. Roles:

* `raise`: `fit` and `evaluate` raise an error (a crashing client).
* `stall`: `fit` and `evaluate` sleep `fault-stall-seconds` before answering (a hanging
  client; set it above `round-timeout` so the round gives up on it).
* `nan`: `fit` trains, then returns weights full of NaN.
* `garbage`: `fit` returns, by turns per round, a missing array, a wrong shape, float64
  arrays, or `num_examples` of 0 or -1.
* attackers (`fit` only): `sign-flip` sends the global weights minus `attack-scale` times
  its update, `scale` plus `attack-scale` times its update, `gaussian` the global weights
  plus N(0, `attack-noise-std`^2) noise, `label-flip` trains honestly on labels c -> C-1-c.
* `straggler`: an honest client on a device `slow-client-slowdown` times slower: its
  training and evaluation sleep (slowdown - 1) times each piece of work's measured
  duration right after it (each compiled chunk of training steps, each evaluation), so
  they take `slowdown` times as long where they run, and the node's own clock (a time
  budget, `round-time-budget`'s measurement) sees its slowness, as a real slow device's
  would. In deployment, node-config `slowdown` makes one node such a client
  (`KerasClient.slowdown`), whatever the fault keys say.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar

from fl_app.client.wrapper import ClientWrapper
from fl_app.data.sources import ClientData, DataSpec, Split
from fl_app.schema import ConfigError, LayerSettings, Setting
from fl_app.wire import SERVER_ROUND

if TYPE_CHECKING:  # the client imports TensorFlow; the config reads this module's keys
    from fl_app.client.keras_client import KerasClient

ATTACKS = ("none", "sign-flip", "scale", "gaussian", "label-flip")
FAULT_KEYS = {"raise": "fault-raise-fraction", "stall": "fault-stall-fraction",
              "nan": "fault-nan-fraction", "garbage": "fault-garbage-fraction"}
STRAGGLER = "straggler"
NODE_SLOWDOWN = "slowdown"  # node-config key: this node runs that many times slower
GARBAGE_KINDS = ("missing-array", "wrong-shape", "float64", "zero-examples", "negative-examples")
_ROLE_SALT = 0xFA0175


def _fraction(key: str, what: str) -> Setting:
    return Setting(key, float, 0.0, f"Simulation: fraction of clients that {what}.", "faults",
                   low=0.0, high=1.0)


SETTINGS = [
    _fraction("fault-raise-fraction", "raise an error in fit and evaluate"),
    _fraction("fault-stall-fraction", "stall (sleep fault-stall-seconds) in fit and evaluate"),
    Setting("fault-stall-seconds", float, 60.0,
            "Simulation: how long a stalling client sleeps (set it above round-timeout).",
            "faults", low=0.0),
    _fraction("fault-nan-fraction", "return NaN weights from fit"),
    _fraction("fault-garbage-fraction",
              "return garbage from fit (wrong array count/shape/dtype, num_examples <= 0)"),
    Setting("attack", str, "none", "Simulation: attack run by the attack-fraction of clients.",
            "faults", choices=ATTACKS),
    _fraction("attack-fraction", "are malicious (run the configured attack)"),
    Setting("attack-scale", float, 10.0,
            "sign-flip / scale attacks: factor applied to the attacker's update.", "faults",
            low=0.0, low_open=True),
    Setting("attack-noise-std", float, 1.0,
            "gaussian attack: standard deviation of the noise sent as the update.", "faults",
            low=0.0, low_open=True),
    _fraction("slow-client-fraction",
              "are stragglers (honest, slow-client-slowdown times slower in fit and evaluate)"),
    Setting("slow-client-slowdown", float, 10.0,
            "Stragglers' slowdown N: each chunk of training steps and each evaluation then "
            "sleeps N-1 times its measured duration, so it takes N times as long, seen by "
            "the node's own clock (deployment: node-config `slowdown`).",
            "faults", low=1.0),
]


@dataclass(frozen=True)
class FaultSettings(LayerSettings):
    """The fault-injection, attack and straggler keys (`SETTINGS`) and the run's seed, which
    draws the roles: built once by the app layer (`FaultSettings.from_config(cfg)`)."""

    fault_raise_fraction: float
    fault_stall_fraction: float
    fault_stall_seconds: float
    fault_nan_fraction: float
    fault_garbage_fraction: float
    attack: str
    attack_fraction: float
    attack_scale: float
    attack_noise_std: float
    slow_client_fraction: float
    slow_client_slowdown: float
    seed: int

    def fraction(self, key: str) -> float:
        """The fraction under run-config key `key` (e.g. `fault-nan-fraction`)."""
        return float(getattr(self, key.replace("-", "_")))


def _fractions(settings: FaultSettings) -> dict[str, float]:
    keys = [*FAULT_KEYS.values(), *(["attack-fraction"] if settings.attack != "none" else []),
            "slow-client-fraction"]
    return {key: settings.fraction(key) for key in keys}


def check_config(values: Mapping[str, Scalar]) -> None:
    """Raise ConfigError if the fault and attack fractions add up to more than 1.

    `fl_app.app.config.resolve` runs this for every config; the counts on a given number of
    clients (rounded, so they may exceed it still) are `role_counts`' check.
    """
    fractions = _fractions(FaultSettings.from_config(values))
    if sum(fractions.values()) > 1.0 + 1e-9:
        raise ConfigError(f"run-config keys {', '.join(repr(k) for k in fractions)} add up to "
                          f"{sum(fractions.values()):g}: a client has at most one role, so they "
                          "must add up to at most 1")


def _count(fraction: float, num_partitions: int) -> int:
    return int(fraction * num_partitions + 0.5)


def role_counts(settings: FaultSettings, num_partitions: int) -> list[tuple[str, int]]:
    """How many clients get each role; raise ConfigError if they exceed the clients."""
    fractions = _fractions(settings)
    roles = [*FAULT_KEYS, *([settings.attack] if settings.attack != "none" else []), STRAGGLER]
    counts = [(role, _count(f, num_partitions)) for role, f in zip(roles, fractions.values())]
    if sum(n for _, n in counts) > num_partitions:
        raise ConfigError(f"run-config keys {', '.join(repr(k) for k in fractions)} assign "
                          f"{sum(n for _, n in counts)} faulty, malicious or slow clients out of "
                          f"{num_partitions} (counts are rounded half up): lower them")
    return counts


def assign_roles(settings: FaultSettings, num_partitions: int) -> dict[int, str]:
    """Partition id -> role for every misbehaving or slow client (deterministic from `seed`)."""
    order = np.random.default_rng([settings.seed, _ROLE_SALT]).permutation(num_partitions)
    roles: dict[int, str] = {}
    start = 0
    for role, count in role_counts(settings, num_partitions):
        roles.update({int(pid): role for pid in order[start:start + count]})
        start += count
    return roles


def flip_labels(split: Split, spec: DataSpec) -> Split:
    """The same features with every class c replaced by num_classes - 1 - c (each 0/1 label
    inverted for binary and multi-label data)."""
    if not spec.is_classification:
        raise ConfigError("attack='label-flip' needs classes to flip; the dataset is "
                          f"{spec.describe()}: use another attack")
    top = spec.num_classes - 1 if spec.task == "multiclass" else 1
    return Split(split.x, (top - split.y).astype(split.y.dtype))


def garbage(weights: NDArrays, num_examples: int, kind: str) -> tuple[NDArrays, int]:
    """A malformed fit result of the given `GARBAGE_KINDS` kind."""
    if kind == "missing-array":
        return weights[:-1], num_examples
    if kind == "wrong-shape":
        return [weights[0].reshape(-1)[:-1], *weights[1:]], num_examples
    if kind == "float64":
        return [w.astype(np.float64) for w in weights], num_examples
    return weights, 0 if kind == "zero-examples" else -1


class FaultyClient(ClientWrapper):
    """Wraps an honest client and misbehaves according to `role` (see the module doc);
    faults strike in fit and evaluate only."""

    def __init__(self, inner: NumPyClient, role: str, settings: FaultSettings,
                 partition_id: int) -> None:
        super().__init__(inner)
        self.role = role
        self.settings = settings
        self.partition_id = partition_id

    def _misbehave_before(self, call: str) -> None:
        if self.role == "raise":
            raise RuntimeError(f"injected fault: client {self.partition_id} raises in {call}")
        if self.role == "stall":
            time.sleep(self.settings.fault_stall_seconds)

    def fit(self, parameters: NDArrays,
            config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train like the inner client, then corrupt or poison the result per the role."""
        self._misbehave_before("fit")
        weights, num_examples, metrics = self.inner.fit(parameters, config)
        server_round = int(config.get(SERVER_ROUND, 0))
        if self.role == "nan":
            weights = [np.full_like(w, np.nan) for w in weights]
        elif self.role == "garbage":
            kind = GARBAGE_KINDS[(self.partition_id + server_round) % len(GARBAGE_KINDS)]
            weights, num_examples = garbage(weights, num_examples, kind)
        elif self.role in ("sign-flip", "scale", "gaussian"):
            weights = self._attack(parameters, weights, server_round)
        return weights, num_examples, metrics

    def _attack(self, sent: NDArrays, trained: NDArrays, server_round: int) -> NDArrays:
        if self.role == "gaussian":
            rng = np.random.default_rng([self.settings.seed, server_round, self.partition_id])
            std = self.settings.attack_noise_std
            return [(g + rng.normal(0.0, std, g.shape)).astype(g.dtype) for g in sent]
        factor = self.settings.attack_scale * (-1.0 if self.role == "sign-flip" else 1.0)
        return [(g + factor * (w - g)).astype(g.dtype) for g, w in zip(sent, trained)]

    def evaluate(self, parameters: NDArrays,
                 config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        """Evaluate like the inner client (raising or stalling first, per the role)."""
        self._misbehave_before("evaluate")
        return self.inner.evaluate(parameters, config)


def node_slowdown(node_config: Mapping[str, Scalar]) -> float:
    """Node-config `slowdown` (1.0 when absent); ConfigError unless it is a number >= 1."""
    value = node_config.get(NODE_SLOWDOWN, 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 1.0:
        raise ConfigError(f"node-config key {NODE_SLOWDOWN!r} is {value!r}: it must be a "
                          "number >= 1 (how many times slower this node runs)")
    return float(value)


def with_faults(client: KerasClient, settings: FaultSettings,
                node_config: Mapping[str, Scalar]) -> NumPyClient:
    """`client` (a `KerasClient`) wrapped per this node's role, or unchanged if it has none.

    Label-flip attackers keep the honest client but train on flipped labels; stragglers
    keep it with its `slowdown` set; a node-config `slowdown` above 1 makes the node that
    slow whatever its role.
    """
    slowdown = node_slowdown(node_config)
    if slowdown > 1.0:
        client.slowdown = slowdown
        return client
    roles_configured = any(_fractions(settings).values())
    if not roles_configured:
        return client
    if "partition-id" not in node_config:
        raise ConfigError("fault injection, attacks and stragglers (fault-*, attack-*, "
                          "slow-client-*) are for simulation: this node has no 'partition-id' in "
                          "its node-config (use node-config 'slowdown' for a slow node)")
    partition_id = int(node_config["partition-id"])
    role = assign_roles(settings, int(node_config["num-partitions"])).get(partition_id)
    if role is None:
        return client
    if role == STRAGGLER:
        client.slowdown = settings.slow_client_slowdown
        return client
    if role == "label-flip":
        data: ClientData = client.data
        client.data = ClientData(flip_labels(data.train, client.trainer.spec), data.val,
                                 f"{data.source} (labels flipped)")
        return client
    return FaultyClient(client, role, settings, partition_id)
