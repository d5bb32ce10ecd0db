"""Real Flower message objects for strategy tests (no server needed)."""

from __future__ import annotations

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy


class IdleProxy(ClientProxy):
    """A client handle that only carries an id: aggregation never talks to the client."""

    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


class AnsweringProxy(IdleProxy):
    """A client that answers every fit with the model it was sent (and `metrics`)."""

    def __init__(self, cid: str, metrics: dict | None = None) -> None:
        super().__init__(cid)
        self.metrics = metrics or {}
        self.fits = 0

    def fit(self, ins, timeout, group_id):
        self.fits += 1
        return fit_res(parameters_to_ndarrays(ins.parameters), 5, dict(self.metrics))


class FailingProxy(IdleProxy):
    """A client whose every fit fails."""

    def fit(self, ins, timeout, group_id):
        raise RuntimeError(f"client {self.cid} is down")


def fit_res(arrays: list[np.ndarray], num_examples: int, metrics: dict | None = None) -> FitRes:
    """A successful FitRes carrying `arrays`."""
    return FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(arrays), num_examples,
                  metrics or {})


def results(updates: list[tuple[list[np.ndarray], int]]) -> list[tuple[ClientProxy, FitRes]]:
    """Fit results from (arrays, num_examples) pairs, client ids c0, c1, ..."""
    return [(IdleProxy(f"c{i}"), fit_res(a, n)) for i, (a, n) in enumerate(updates)]


def random_model(rng: np.random.Generator, shapes=((4, 3), (3,), (3, 2))) -> list[np.ndarray]:
    """Random float32 arrays of the given shapes."""
    return [rng.normal(size=s).astype(np.float32) for s in shapes]
