"""What a registered strategy is, and what it combines with: `StrategySpec`.

Each strategy module lists its strategies as specs (`SPECS`); the registry collects them, and
`strategies.combinations` derives every refusal (SecAgg+, homomorphic encryption, FedBuff, a
DP wrapper's inner strategy) from their flags. A flag is a fact about the aggregation:

- `sums`: the aggregate reads the updates only through their example-weighted sum (and the
  summed count). SecAgg+ hands the server exactly that, never one update.
- `linear`: the aggregate *is* that weighted sum over the summed count, with no server-side
  step or state on the plaintext model. Homomorphic encryption computes nothing else on
  ciphertexts, and FedBuff's server step generalises nothing else.
- `takes_private_average`: it can be a DP wrapper's `dp-inner`, which is handed one privatized
  average and none of the clients' own figures.

A flag left unset (None) counts as False: a new strategy that declares nothing is refused
with everything secure rather than silently accepted (`tests/test_strategy_specs.py` checks
that every registered spec sets every flag).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

FLAGS = ("sums", "linear", "takes_private_average")
"""The capability flags every spec must set."""


@dataclass(frozen=True)
class StrategySpec:
    """One registered strategy (or DP wrapper) and its capabilities.

    Args:
        name: the registry name (`strategy=<name>` in the run config).
        build: the factory: `build(ctx)` for a strategy, `build(inner, ctx)` for a wrapper.
        wrapper: whether it wraps the `dp-inner` strategy (the DP wrappers).
        needs: what it does that a protected or asynchronous run cannot, in a phrase that
            completes "strategy=<name> ..." (shown when it is refused; "" when it needs
            nothing of the kind).
        sums, linear, takes_private_average: the capability flags (module doc).
    """

    name: str
    build: Callable[..., Any]
    wrapper: bool = False
    needs: str = ""
    sums: bool | None = None
    linear: bool | None = None
    takes_private_average: bool | None = None

    def can(self, flag: str) -> bool:
        """Whether the spec sets capability `flag` to True (unset counts as False)."""
        if flag not in FLAGS:
            raise KeyError(f"unknown capability flag {flag!r} (flags: {', '.join(FLAGS)})")
        return getattr(self, flag) is True

    def unset_flags(self) -> list[str]:
        """The capability flags this spec leaves unset."""
        return [f.name for f in fields(self) if f.name in FLAGS and getattr(self, f.name) is None]
