"""Client-level privacy accounting for the DP strategies, with Google's dp-accounting.

Each round that releases a noised aggregate is one sampled Gaussian mechanism: the sum of
the clipped updates (L2 sensitivity C per client) plus Gaussian noise of std z·C, where z
is the round's noise multiplier (for adaptive clipping: the combined multiplier of the
update and the clipped-count queries, see `strategies.dp`). The rounds compose; ε at δ is
read from dp-accounting's RDP or PLD accountant, never from a hand-written formula.

Client sampling and neighbouring relation:
- `fixed`: m of the N available clients are sampled uniformly without replacement. The
  matching relation is "replace one client" (N is public), under which the sum of clipped
  updates has sensitivity 2C, so the Gaussian event's multiplier is z/2; the RDP
  accountant amplifies it with `SampledWithoutReplacementDpEvent(N, m, ·)` (Wang, Balle
  and Kasiviswanathan, 2019). dp-accounting's PLD accountant has no such event, so `pld`
  with `fixed` sampling is refused.
- `poisson`: every available client takes part independently with probability q (the
  `fraction-fit`), the relation is "add or remove one client" (sensitivity C, multiplier
  z), and both accountants amplify it with `PoissonSampledDpEvent(q, ·)`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from logging import INFO
from typing import Any

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from flwr.common.logger import log

from fl_app.schema import ConfigError

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("fixed", "poisson")
NeighborRel = dp_accounting.NeighboringRelation


@dataclass(frozen=True)
class RoundEvent:
    """One round's release: noise multiplier z, clients sampled (m; 0 under Poisson
    sampling, whose rate is the accountant's) out of the N available."""

    noise_multiplier: float
    sample_size: int
    population: int


MAX_DEFAULT_DELTA = 1e-5


def default_delta(population: int) -> float:
    """δ = min(1e-5, 1/(10·N)) for N clients: at most 1e-5, and far below 1/N.

    A mechanism that publishes one whole client's data with probability δ is (0, δ)-DP,
    so δ means something only when it is much smaller than 1/N.
    """
    if population < 1:
        raise ConfigError(f"target-delta=0 derives δ from the number of clients N, which "
                          f"must be at least 1 (N={population}); set target-delta")
    return float(min(MAX_DEFAULT_DELTA, 0.1 / population))


def check_delta(delta: float, population: int) -> None:
    """Refuse a δ of at least 1/N for N clients: at that δ a mechanism may publish one
    client's whole data (that client's with probability δ, N·δ ≥ 1 in total) and still
    satisfy (ε, δ)-DP."""
    if delta >= 1 / population:
        raise ConfigError(
            f"run-config key 'target-delta' ({delta:g}) must be below 1/N = {1 / population:g} "
            f"for N={population} clients: with δ >= 1/N, publishing one client's whole data "
            f"with probability δ satisfies the guarantee; use at most {0.1 / population:.2g} "
            "(or 0 for min(1e-5, 1/(10N)))")


def _grouped(events: tuple[RoundEvent, ...]) -> tuple[tuple[RoundEvent, int], ...]:
    """Runs of identical consecutive events, as (event, count)."""
    return tuple((event, len(list(run))) for event, run in itertools.groupby(events))


@lru_cache(maxsize=512)
def _epsilon(kind: str, sampling: str, rate: float, delta: float,
             runs: tuple[tuple[RoundEvent, int], ...]) -> float:
    if not runs:
        return 0.0
    if any(event.noise_multiplier == 0 for event, _ in runs):
        return math.inf
    relation = NeighborRel.REPLACE_ONE if sampling == "fixed" else NeighborRel.ADD_OR_REMOVE_ONE
    accountant = (RdpAccountant(neighboring_relation=relation) if kind == "rdp"
                  else PLDAccountant(neighboring_relation=relation))
    for event, count in runs:
        accountant.compose(sampled_event(event, sampling, rate), count)
    return float(accountant.get_epsilon(delta))


def sampled_event(event: RoundEvent, sampling: str, rate: float) -> dp_event.DpEvent:
    """The dp-accounting event of one round (see the module docstring for the relation)."""
    if sampling == "fixed":
        gaussian = dp_event.GaussianDpEvent(event.noise_multiplier / 2)  # replace-one: 2C
        return dp_event.SampledWithoutReplacementDpEvent(event.population, event.sample_size,
                                                         gaussian)
    return dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(event.noise_multiplier))


RELATIONS = {"fixed": "replace-one", "poisson": "add-remove"}  # neighbouring relation by sampling
EMPTY_SAMPLE_MARGIN = 0.01  # (1 - q)^N must be at most this fraction of δ


def check_empty_sample(rate: float, population: int, delta: float) -> None:
    """Refuse Poisson sampling whose empty sample, probability (1 − q)^N, is not far below δ:
    an empty sample skips the round (Flower cancels rounds without clients), an event the
    accounting does not cover."""
    empty = (1 - rate) ** population
    if empty > EMPTY_SAMPLE_MARGIN * delta:
        raise ConfigError(
            f"dp-sampling='poisson' with fraction-fit={rate:g} and N={population} clients "
            f"samples nobody with probability (1-q)^N = {empty:.3g}, not far below delta = "
            f"{delta:.3g} (at most {EMPTY_SAMPLE_MARGIN:g} x delta): raise fraction-fit, add "
            "clients, or use dp-sampling='fixed'")


class PrivacyAccountant:
    """The ledger of released rounds and ε at δ over them (RDP or PLD accountant).

    `target_delta` 0 means δ = min(1e-5, 1/(10·N)), fixed from the number of clients N
    available when δ is first needed; a δ of at least 1/N is refused. `poisson_rate` is the
    sampling probability q for `poisson` sampling.
    """

    def __init__(self, kind: str = "rdp", sampling: str = "fixed", poisson_rate: float = 0.0,
                 target_delta: float = 0.0) -> None:
        if kind not in ACCOUNTANTS:
            raise ConfigError(f"run-config key 'accountant' must be one of {ACCOUNTANTS}, "
                              f"got {kind!r}")
        if sampling not in SAMPLINGS:
            raise ConfigError(f"run-config key 'dp-sampling' must be one of {SAMPLINGS}, "
                              f"got {sampling!r}")
        if kind == "pld" and sampling == "fixed":
            raise ConfigError(
                "accountant='pld' cannot account fixed-size client sampling (m of N without "
                "replacement: dp-accounting's PLD accountant has no such event); use "
                "dp-sampling='poisson' with the PLD accountant, or accountant='rdp'")
        if sampling == "poisson" and not 0 < poisson_rate <= 1:
            raise ConfigError(f"poisson sampling needs a rate in (0, 1], got {poisson_rate}")
        self.kind = kind
        self.sampling = sampling
        self.poisson_rate = poisson_rate
        self.delta: float | None = target_delta or None
        self.relation = RELATIONS[sampling]
        self._checked = False
        self.rounds: list[RoundEvent] = []

    def fix_delta(self, population: int) -> float:
        """δ: the configured target, else min(1e-5, 1/(10·N)) for the first N seen (kept
        thereafter). The first call refuses a δ >= 1/N and, under Poisson sampling, an empty
        sample not far less likely than δ."""
        if self.delta is None:
            self.delta = default_delta(population)
            log(INFO, "DP: reporting epsilon at delta = min(1e-5, 1/(10N)) = %.3g for N = %s "
                "clients", self.delta, population)
        if not self._checked:  # once: clients that leave mid-run must not crash a released run
            check_delta(self.delta, population)
            if self.sampling == "poisson":
                check_empty_sample(self.poisson_rate, population, self.delta)
            self._checked = True
        return self.delta

    def event(self, noise_multiplier: float, sample_size: int, population: int) -> RoundEvent:
        """A round's event; under Poisson sampling the sample size does not enter (0)."""
        return RoundEvent(noise_multiplier, sample_size if self.sampling == "fixed" else 0,
                          population)

    def record(self, event: RoundEvent) -> None:
        """Add a released round to the ledger."""
        self.rounds.append(event)

    def epsilon(self, upcoming: RoundEvent | None = None) -> float:
        """ε at δ over the recorded rounds (plus `upcoming`, to check a budget before it)."""
        if self.delta is None:
            raise RuntimeError("δ is not fixed yet: call fix_delta(population) first")
        events = tuple(self.rounds) + ((upcoming,) if upcoming else ())
        return _epsilon(self.kind, self.sampling, self.poisson_rate, self.delta,
                        _grouped(events))

    def get_state(self) -> dict[str, Any]:
        """δ and the ledger of released rounds (JSON-serialisable)."""
        return {"delta": self.delta, "rounds": [asdict(event) for event in self.rounds]}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore what `get_state` returned."""
        self.delta = state["delta"]
        self.rounds = [RoundEvent(**event) for event in state["rounds"]]
