"""Poisson client sampling, as a view of a client manager that any strategy can sample from."""

from __future__ import annotations

import numpy as np
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion


class PoissonSampling(ClientManager):
    """A client manager whose `sample` takes each available client independently with
    probability `rate` (ignoring the requested number), drawn from `rng`.

    Everything else is delegated to `base`. A DP wrapper hands this view to its inner
    strategy's `configure_fit`, so the inner strategy's own sampling code is reused while
    the sample follows the Poisson scheme the privacy accountant assumes.
    """

    def __init__(self, base: ClientManager, rate: float, rng: np.random.Generator) -> None:
        self.base = base
        self.rate = rate
        self.rng = rng

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

    def wait_for(self, num_clients: int, timeout: int = 86400) -> bool:
        """Delegate to the base client manager."""
        return self.base.wait_for(num_clients, timeout)

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Criterion | None = None) -> list[ClientProxy]:
        """Once `min_num_clients` are connected, keep each client with probability `rate`."""
        self.base.wait_for(num_clients if min_num_clients is None else min_num_clients)
        clients = self.base.all()
        eligible = [cid for cid, client in clients.items()
                    if criterion is None or criterion.select(client)]
        # A base that knows stable client keys (SeededClientManager) orders reproducibly.
        eligible = getattr(self.base, "ordered", sorted)(eligible)
        keep = self.rng.random(len(eligible)) < self.rate
        return [clients[cid] for cid, kept in zip(eligible, keep) if kept]
