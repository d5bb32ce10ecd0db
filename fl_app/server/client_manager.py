"""Flower's client manager with reproducible sampling and clients named in every failure."""

from __future__ import annotations

import random
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from logging import WARNING
from typing import Any

from flwr.common import Code, GetPropertiesIns
from flwr.common.logger import log
from flwr.server import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion

from fl_app.server.client_failures import NamedClientProxy
from fl_app.server.prompt_grid import prompt
from fl_app.wire import CLIENT_KEY


class SeededClientManager(SimpleClientManager):
    """Flower's client manager with reproducible sampling.

    Node ids are random in every run, so clients are ordered by a stable key each client
    reports once through `get_properties` (`client-key`: its partition in simulation, or
    the name its node config gives; a node that gives none sorts by its node id), and the
    seeded RNG samples positions in that order. When every client is sampled no
    key is needed and none is asked for.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self._rng = random.Random(seed)
        self._keys: dict[str, str] = {}

    def register(self, client: ClientProxy) -> bool:
        """Register `client` wrapped so that its failures name it (`NamedClientProxy`) and
        its replies are seen as soon as they arrive (`PromptGrid`)."""
        return super().register(NamedClientProxy(prompt(client)))

    def _ask_key(self, cid: str) -> str:
        fallback = f"~{cid}"  # a client that cannot say sorts after those that can
        try:
            res = self.clients[cid].get_properties(GetPropertiesIns(config={}), timeout=120,
                                                   group_id=0)
        except Exception:  # a broken client keeps its node id as key
            return fallback
        if res.status.code != Code.OK:
            return fallback
        return str(res.properties.get(CLIENT_KEY, fallback))

    def ordered(self, cids: Iterable[str]) -> list[str]:
        """`cids` sorted by their clients' stable keys (asked once per client, in parallel)."""
        cids = list(cids)
        missing = [cid for cid in cids if cid not in self._keys]
        if missing:
            with ThreadPoolExecutor(max_workers=min(32, len(missing))) as pool:
                self._keys.update(zip(missing, pool.map(self._ask_key, missing)))
        return sorted(cids, key=lambda cid: (self._keys[cid], cid))

    def warm_up(self) -> None:
        """Ask every connected client for its key now, which starts its ClientApp (in
        simulation: a worker importing TensorFlow, loading data, building the model), so
        that a round timeout measures the round rather than the start-up."""
        self.ordered(self.all())  # all(): Flower registers newly connected nodes on this call

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Criterion | None = None) -> list[ClientProxy]:
        """Sample `num_clients` clients once at least `min_num_clients` are connected."""
        self.wait_for(num_clients if min_num_clients is None else min_num_clients)
        available = [cid for cid, client in self.clients.items()
                     if criterion is None or criterion.select(client)]
        if num_clients > len(available):
            log(WARNING, "sampling %s clients but only %s are available", num_clients,
                len(available))
            return []
        if num_clients == len(available):
            return [self.clients[cid] for cid in sorted(available)]
        ordered = self.ordered(available)
        return [self.clients[cid] for cid in self._rng.sample(ordered, num_clients)]

    def get_state(self) -> dict[str, Any]:
        """The sampling RNG's state (for checkpoints)."""
        version, internal, gauss_next = self._rng.getstate()
        return {"rng": [version, list(internal), gauss_next]}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore the sampling RNG from `get_state`'s output."""
        version, internal, gauss_next = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss_next))
