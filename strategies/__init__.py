"""Server strategies: WeightedFedAvg, wrappers, validation, and the name registry."""

from strategies.validated import ValidatedStrategy
from strategies.weighted_fedavg import WeightedFedAvg, weighted_average
from strategies.wrapper import StrategyWrapper

__all__ = ["StrategyWrapper", "ValidatedStrategy", "WeightedFedAvg", "weighted_average"]
