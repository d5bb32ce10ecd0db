"""Drive DP strategies round by round with real Flower objects (no simulation engine)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.common import FitIns, NDArrays, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from strategies.accounting import PrivacyAccountant
from strategies.dp import DPAdaptiveClipping, DPFixedClipping
from strategies.validated import ValidatedStrategy
from strategies.weighted_fedavg import WeightedFedAvg
from tests.flower_objects import IdleProxy, fit_res

SHAPES = ((20, 10), (10,))

# client proxy, its FitIns -> (weights it returns, num_examples, metrics)
ClientFn = Callable[[ClientProxy, FitIns], tuple[NDArrays, int, dict]]


def client_manager(num_clients: int) -> SimpleClientManager:
    """Flower's client manager with `num_clients` idle clients c0, c1, ..."""
    manager = SimpleClientManager()
    for i in range(num_clients):
        manager.register(IdleProxy(f"c{i}"))
    return manager


def zeros(shapes=SHAPES) -> NDArrays:
    """A float32 model of zeros."""
    return [np.zeros(s, dtype=np.float32) for s in shapes]


def dp_strategy(*, adaptive: bool = False, fraction_fit: float = 1.0,
                initial: NDArrays | None = None, accountant: PrivacyAccountant | None = None,
                min_fit_clients: int = 1, **kwargs) -> DPFixedClipping:
    """A DP wrapper around WeightedFedAvg sampling `fraction_fit` of the clients."""
    inner = WeightedFedAvg(fraction_fit=fraction_fit, min_fit_clients=min_fit_clients,
                           min_available_clients=1,
                           initial_parameters=ndarrays_to_parameters(initial or zeros()))
    cls = DPAdaptiveClipping if adaptive else DPFixedClipping
    kwargs.setdefault("noise_multiplier", 0.0)
    kwargs.setdefault("clipping_norm", 1.0)
    return cls(inner, accountant=accountant or PrivacyAccountant(), fraction_fit=fraction_fit,
               min_fit_clients=min_fit_clients, **kwargs)


def play_round(strategy, manager, server_round: int, weights: NDArrays,
               client: ClientFn) -> tuple[NDArrays | None, dict, list]:
    """configure_fit, let every sampled client answer via `client`, aggregate_fit.

    The DP strategy plays behind `ValidatedStrategy`, as the registry builds it (with no
    minimum of valid updates: a DP round is always released).
    """
    strategy = ValidatedStrategy(strategy, min_fit_clients=0)
    instructions = strategy.configure_fit(server_round, ndarrays_to_parameters(weights), manager)
    results = []
    for proxy, ins in instructions:
        arrays, num_examples, metrics = client(proxy, ins)
        results.append((proxy, fit_res(arrays, num_examples, metrics)))
    if not results:
        return None, {}, instructions
    parameters, metrics = strategy.aggregate_fit(server_round, results, [])
    new = None if parameters is None else parameters_to_ndarrays(parameters)
    return new, metrics, instructions


def sends(updates: dict[str, NDArrays], base: NDArrays, num_examples: int = 10) -> ClientFn:
    """Clients that return base + their fixed update (by client id)."""
    def client(proxy, ins):
        return ([(b + u).astype(b.dtype) for b, u in zip(base, updates[proxy.cid])],
                num_examples, {})
    return client
