"""The base of the aggregations that scale each update by a figure its own client reports
(FedNova's local steps, q-FFL's loss): the global model a round starts from, the updates
whose figure is usable, and the new model from them."""

from __future__ import annotations

from abc import abstractmethod
from logging import WARNING

from flwr.common import FitIns, FitRes, NDArrays, Parameters, Scalar
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy

from strategies.decoding import decode, encode
from strategies.metrics import weighted_metrics
from strategies.weighted_fedavg import WeightedFedAvg


class PerClientFigure(WeightedFedAvg):
    """WeightedFedAvg's sampling and evaluation with an aggregation (`step`) that scales each
    update by a figure its client reports in its fit metrics (`figure`).

    It remembers the global model it sends in `configure_fit` and aggregates the round's
    updates against it; an update whose figure is missing or unusable is left out of the
    round and logged (`name` and `requirement` say whose and what is needed). The updates
    are decoded without a copy (`strategies.decoding`); its fit metrics are averaged over
    the kept updates by `num_examples`. Arguments: those of `WeightedFedAvg`.
    """

    name = ""  # the strategy, in log lines and errors
    requirement = ""  # what a usable figure is, in the log line of an update left out

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._sent: dict[int, Parameters] = {}

    @abstractmethod
    def figure(self, fit_res: FitRes) -> float | None:
        """The update's figure from its fit metrics (None: missing or unusable)."""

    @abstractmethod
    def step(self, global_weights: NDArrays, client_weights: list[NDArrays],
             figures: list[float], num_examples: list[int]) -> NDArrays:
        """The new global model from the kept clients' models, figures and example counts."""

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """As WeightedFedAvg, remembering the global model this round starts from."""
        self._sent = {server_round: parameters}
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list[tuple[ClientProxy, FitRes] | BaseException],
                      ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """`step` of the updates with a usable figure (None without such updates, or with
        failures when `accept_failures` is off).

        Raises RuntimeError if the round was not configured by this strategy.
        """
        sent = self._sent.get(server_round)
        if sent is None:
            raise RuntimeError(f"{self.name}: round {server_round} was not configured by this "
                               "strategy, so the model the updates start from is unknown")
        usable, figures = [], []
        for proxy, fit_res in results:
            figure = self.figure(fit_res)
            if figure is None:
                log(WARNING, "round %s: %s leaves out client %s: its fit metrics carry no %s",
                    server_round, self.name, proxy.cid, self.requirement)
            else:
                usable.append((proxy, fit_res))
                figures.append(figure)
        if self._declines(server_round, usable, failures):
            return None, {}
        new = self.step(decode(sent), [decode(r.parameters) for _, r in usable], figures,
                        [r.num_examples for _, r in usable])
        metrics = weighted_metrics((r.num_examples, r.metrics) for _, r in usable)
        return encode(new), metrics
