"""DP client sampling: a view of a client manager that samples with the DP wrapper's own RNG.

Privacy amplification by sampling assumes nobody can predict the sample. The run's `seed`
is part of the run config, which every client receives, so a sample drawn from it is
predictable; the DP wrappers hand their inner strategy this view instead, drawing from a
fresh OS-entropy generator each round (or a seeded one with `dp-noise-seed`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import numpy as np
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion


@runtime_checkable
class OrdersClients(Protocol):
    """A client manager that knows a run-independent order of its clients
    (fl_app.server's `SeededClientManager`)."""

    def ordered(self, cids: Iterable[str]) -> list[str]:
        """`cids` in an order that does not depend on the run's random node ids."""


WAIT_TIMEOUT = 86400
"""Seconds `wait_for` waits for clients unless told: Flower's `SimpleClientManager` default
(the abstract `ClientManager.wait_for` has none)."""


class DPSampling(ClientManager):
    """A client manager whose `sample` draws from `rng`: `num_clients` clients uniformly
    without replacement, or, with `poisson_rate`, each available client independently
    with that probability (ignoring the requested number).

    Everything else is delegated to `base`, so the inner strategy's own sampling code is
    reused while the sample follows the scheme the privacy accountant assumes.
    """

    def __init__(self, base: ClientManager, rng: np.random.Generator,
                 poisson_rate: float | None = None) -> None:
        self.base = base
        self.rng = rng
        self.poisson_rate = poisson_rate

    def num_available(self) -> int:
        """Delegate to the base client manager."""
        return self.base.num_available()

    def register(self, client: ClientProxy) -> bool:
        """Delegate to the base client manager."""
        return self.base.register(client)

    def unregister(self, client: ClientProxy) -> None:
        """Delegate to the base client manager."""
        self.base.unregister(client)

    def all(self) -> dict[str, ClientProxy]:
        """Delegate to the base client manager."""
        return self.base.all()

    def wait_for(self, num_clients: int, timeout: int = WAIT_TIMEOUT) -> bool:
        """Delegate to the base client manager."""
        return self.base.wait_for(num_clients, timeout)

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Criterion | None = None) -> list[ClientProxy]:
        """Once `min_num_clients` are connected, draw the sample from `rng`."""
        self.base.wait_for(num_clients if min_num_clients is None else min_num_clients,
                           WAIT_TIMEOUT)
        clients = self.base.all()
        eligible = [cid for cid, client in clients.items()
                    if criterion is None or criterion.select(client)]
        eligible = (self.base.ordered(eligible) if isinstance(self.base, OrdersClients)
                    else sorted(eligible))
        if self.poisson_rate is not None:
            keep = self.rng.random(len(eligible)) < self.poisson_rate
            return [clients[cid] for cid, kept in zip(eligible, keep) if kept]
        if num_clients > len(eligible):
            return []
        chosen = self.rng.choice(len(eligible), size=num_clients, replace=False)
        return [clients[eligible[i]] for i in sorted(chosen)]
