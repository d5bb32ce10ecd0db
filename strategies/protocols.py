"""What the server loop may ask of a strategy beyond Flower's `Strategy` contract.

A strategy (or any wrapper in a chain of `StrategyWrapper`s) opts in by implementing the
methods; `find_layer` finds the layer that does, so the runner asks for a privacy report
or a budget check without knowing how the strategies are composed. `StreamsFit` is asked
of the outermost strategy only: every layer between the runner and the one that sums must
pass the stream on (or decline it), since each may change what `aggregate_fit` sees.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar, runtime_checkable

from flwr.common import FitRes, Parameters, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
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


class FitStream(Protocol):
    """One fit round aggregated as its replies arrive, instead of all at once."""

    def add(self, proxy: ClientProxy, res: FitRes) -> None:
        """Take one successful reply; once it returns, the caller may drop the reply's
        tensors (the stream keeps what it still needs)."""

    def skip(self, proxy: ClientProxy) -> None:
        """`proxy` failed: it will send no reply this round."""

    def finish(
        self, failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """What the strategy's `aggregate_fit` returns for the replies added, given the
        round's `failures`."""


@runtime_checkable
class StreamsFit(Protocol):
    """A strategy that can aggregate a fit round reply by reply (`FitStream`)."""

    def open_fit_stream(self, server_round: int) -> FitStream | None:
        """A stream for the round just configured (`configure_fit` was called), or None
        when this round must be aggregated whole by `aggregate_fit`."""


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


def privacy_layer(strategy: Strategy) -> PrivacyAccounting | None:
    """The layer of the chain that accounts privacy (a DP wrapper), or None."""
    # (The ignore: mypy refuses a Protocol where type[P] is expected, python/mypy#4717.)
    return find_layer(strategy, PrivacyAccounting)  # type: ignore[type-abstract]
