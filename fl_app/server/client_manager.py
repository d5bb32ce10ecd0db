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
from fl_app.wire import CLIENT_KEY, NUM_EXAMPLES
from strategies.validation import claim_cap, examples_problem


class SeededClientManager(SimpleClientManager):
    """Flower's client manager with reproducible sampling.

    Node ids are random in every run, so clients are ordered by a stable key each client
    reports once through `get_properties` (`client-key`: its partition in simulation, or
    the name its node config gives; a node that gives none sorts by its node id), and the
    seeded RNG samples positions in that order. When every client is sampled no
    key is needed and none is asked for. With `by_size` (`client-sampling='size'`) each
    client is drawn with probability proportional to the training-set size it reports with
    its key (`num-examples`), one after another without replacement, as the q-FFL paper
    samples devices (numpy's `choice(replace=False, p=sizes/total)` in its code); the sizes
    are the clients' own claims, checked as fit claims are: one that reports none, or more
    than `max_examples` (> 0), counts as 1 example, and each draw counts a size at most
    `cap_factor` (> 0: `examples-cap-factor`) x the lower median of the sizes of the
    clients it draws from (both logged), so a client lying about its size cannot take
    every round.
    """

    def __init__(self, seed: int, by_size: bool = False, cap_factor: float = 0.0,
                 max_examples: int = 0) -> None:
        super().__init__()
        self._rng = random.Random(seed)
        self.by_size = by_size
        self.cap_factor = cap_factor
        self.max_examples = max_examples
        self._keys: dict[str, str] = {}
        self._sizes: dict[str, int] = {}

    def register(self, client: ClientProxy) -> bool:
        """Register `client` wrapped so that its failures name it (`NamedClientProxy`) and
        its replies are seen as soon as they arrive (`PromptGrid`)."""
        return super().register(NamedClientProxy(prompt(client)))

    def _ask(self, cid: str) -> tuple[str, int]:
        """The client's key and, with `by_size`, its training-set size (else 1)."""
        key, size = f"~{cid}", None  # a client that cannot say sorts after those that can
        try:
            res = self.clients[cid].get_properties(GetPropertiesIns(config={}), timeout=120,
                                                   group_id=0)
        except Exception:  # a broken client keeps its node id as key
            res = None
        if res is not None and res.status.code == Code.OK:
            key, size = str(res.properties.get(CLIENT_KEY, key)), res.properties.get(NUM_EXAMPLES)
        if not self.by_size:
            return key, 1
        if type(size) is int:
            problem = examples_problem(size, self.max_examples)
            if problem is None:
                return key, size
        else:
            problem = "none reported"
        log(WARNING, "client %s reports no usable training-set size (%r: %s): sampled as "
            "if it held 1 example", cid, NUM_EXAMPLES, problem)
        return key, 1

    def ordered(self, cids: Iterable[str]) -> list[str]:
        """`cids` sorted by their clients' stable keys (asked once per client, in parallel,
        with their sizes)."""
        cids = list(cids)
        missing = [cid for cid in cids if cid not in self._keys]
        if missing:
            with ThreadPoolExecutor(max_workers=min(32, len(missing))) as pool:
                for cid, (key, size) in zip(missing, pool.map(self._ask, missing)):
                    self._keys[cid], self._sizes[cid] = key, size
        return sorted(cids, key=lambda cid: (self._keys[cid], cid))

    def _by_size(self, cids: list[str], num_clients: int) -> list[str]:
        """`num_clients` of `cids` drawn one after another without replacement, each with
        probability proportional to its size (capped, see the class doc) among those left."""
        cap = claim_cap([self._sizes[cid] for cid in cids], self.cap_factor)
        sizes = {cid: self._sizes[cid] if cap is None else min(self._sizes[cid], cap)
                 for cid in cids}
        for cid in cids:
            if sizes[cid] < self._sizes[cid]:
                log(WARNING, "client %s reports %s training examples, sampled as %s "
                    "(examples-cap-factor=%g x the clients' median size)", cid,
                    self._sizes[cid], cap, self.cap_factor)
        left, chosen = list(cids), []
        for _ in range(num_clients):
            place = self._rng.choices(range(len(left)), [sizes[cid] for cid in left])[0]
            chosen.append(left.pop(place))
        return chosen

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
        chosen = (self._by_size(ordered, num_clients) if self.by_size
                  else self._rng.sample(ordered, num_clients))
        return [self.clients[cid] for cid in chosen]

    def get_state(self) -> dict[str, Any]:
        """The sampling RNG's state (for checkpoints)."""
        version, internal, gauss_next = self._rng.getstate()
        return {"rng": [version, list(internal), gauss_next]}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restore the sampling RNG from `get_state`'s output."""
        version, internal, gauss_next = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss_next))
