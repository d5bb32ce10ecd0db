"""What the server loop may ask of a strategy beyond Flower's `Strategy` contract.

A strategy (or any wrapper in a chain of `StrategyWrapper`s) opts in by implementing the
methods; `find_layer` finds the layer that does, so the runner asks for a privacy report
or a budget check without knowing how the strategies are composed.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, runtime_checkable

from flwr.server.client_manager import ClientManager
from flwr.server.strategy import Strategy

StrategyState = dict[str, Any]
"""What a strategy carries from one round to the next: JSON-serialisable values or numpy
arrays, wrappers adding their own under their own key."""


@runtime_checkable
class PrivacyAccounting(Protocol):
    """A strategy that accounts the privacy of what it releases (the DP wrappers)."""

    def privacy_report(self, server_round: int) -> dict[str, Any] | None:
        """ε, δ and what they cover over the rounds released so far (None while there is
        nothing to report)."""

    def budget_allows(self, server_round: int, client_manager: ClientManager) -> bool:
        """False if the next round, among `client_manager`'s clients, would exceed the
        privacy budget; never True while no client is known (it may wait for them)."""

    def ledger(self) -> dict[str, Any]:
        """Every round charged so far: persisted before anything of a round is released."""

    def restore_ledger(self, ledger: dict[str, Any]) -> None:
        """Adopt a persisted ledger that charged rounds a restored checkpoint has not."""


@runtime_checkable
class Stateful(Protocol):
    """A strategy whose state a checkpoint saves and a resumed run restores."""

    def get_state(self) -> StrategyState:
        """The state the next round depends on."""

    def set_state(self, state: StrategyState) -> None:
        """Restore what `get_state` returned into a freshly built strategy."""


@runtime_checkable
class Wrapping(Protocol):
    """A strategy that wraps another (`StrategyWrapper`)."""

    inner: Strategy


P = TypeVar("P")


def find_layer(strategy: Strategy, protocol: type[P]) -> P | None:
    """The outermost strategy in the wrapper chain from `strategy` inwards that implements
    `protocol`, or None."""
    layer: object = strategy
    while True:
        if isinstance(layer, protocol):
            return layer
        if not isinstance(layer, Wrapping):
            return None
        layer = layer.inner
