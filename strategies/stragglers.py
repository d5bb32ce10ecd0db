"""Simulated stragglers doing partial work, as in the FedProx paper's experiments.

Li, Sahu, Zaheer, Sanjabi, Talwalkar and Smith, "Federated Optimization in Heterogeneous
Networks" (MLSys 2020), section 5.2, and its official code (`drop_percent`): each round a
`fraction` of the sampled clients are stragglers that can do only a random 1..E-1 of the
E local epochs (E: the round's `local-epochs`); the other round(n * (1 - fraction)) clients
do all E. The `drop` policy (the paper's FedAvg) leaves the stragglers out of the round, as
if their late updates were discarded; they are not asked to train at all, which gives the
same global model without the wasted work. The `keep` policy (the paper's FedProx) sends
them their partial epochs (`straggler-epochs` in their fit config, see
`fl_app.client.local_work`) and aggregates their partial work with everyone else's.
Who straggles and how much is drawn from `seed` and the round number.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.common import FitIns, FitRes, Parameters, Scalar
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fl_app.schema import ConfigError, Setting
from fl_app.schema import Scalar as ConfigValue
from fl_app.wire import KEY_STRAGGLER_EPOCHS
from strategies.wrapper import StrategyWrapper

POLICIES = ("auto", "drop", "keep")
KEEPING_STRATEGIES = ("fedprox",)  # "auto" keeps the stragglers' partial work for these
_SALT = 0x57A6


class Stragglers(StrategyWrapper):
    """Turns a share of each round's sampled clients into stragglers (see the module doc).

    Args:
        inner: the strategy that samples and aggregates.
        fraction: share of the sampled clients that straggle each round, in [0, 1).
        keep: True to aggregate the stragglers' partial work, False to drop them.
        local_epochs: E, the full local epochs, used when the round's config has none.
        seed: makes the choice of stragglers and their epochs reproducible.
    """

    def __init__(self, inner: Strategy, *, fraction: float, keep: bool, local_epochs: int,
                 seed: int = 0) -> None:
        super().__init__(inner)
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"straggler fraction must be in [0, 1), got {fraction}")
        if keep and local_epochs < 2:
            raise ValueError("stragglers that keep partial work need local_epochs >= 2")
        self.fraction = fraction
        self.keep = keep
        self.local_epochs = local_epochs
        self.seed = seed
        self._stragglers: dict[int, int] = {}

    def __repr__(self) -> str:
        policy = "keep" if self.keep else "drop"
        return f"Stragglers({self.inner!r}, fraction={self.fraction}, policy={policy})"

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """The inner strategy's instructions, with this round's stragglers dropped or told
        to train a random 1..E-1 epochs."""
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        n = len(instructions)
        rng = np.random.default_rng([self.seed, server_round, _SALT])
        chosen = set(rng.choice(n, n - round(n * (1.0 - self.fraction)), replace=False).tolist())
        self._stragglers = {server_round: len(chosen)}
        out = []
        for i, (proxy, ins) in enumerate(instructions):
            if i not in chosen:
                out.append((proxy, ins))
            elif self.keep:
                full = int(ins.config.get("local-epochs", self.local_epochs))
                partial = int(rng.integers(1, max(full, 2)))  # 1..E-1
                out.append((proxy, FitIns(ins.parameters,
                                          {**ins.config, KEY_STRAGGLER_EPOCHS: partial})))
        return out

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The inner aggregate, with the round's straggler count in the metrics."""
        parameters, metrics = self.inner.aggregate_fit(server_round, results, failures)
        key = "stragglers_kept" if self.keep else "stragglers_dropped"
        return parameters, {**metrics, key: self._stragglers.get(server_round, 0)}


SETTINGS = [
    Setting("straggler-fraction", float, 0.0,
            "Simulated stragglers (FedProx paper): share of each round's sampled clients that "
            "can do only a random 1..E-1 of the local-epochs E (0: none).", "strategy",
            low=0.0, high=1.0, high_open=True),
    Setting("straggler-policy", str, "auto",
            "What happens to stragglers: 'drop' leaves them out of the round (the paper's "
            "FedAvg), 'keep' aggregates their partial work (FedProx); 'auto' keeps them for "
            "strategy=fedprox and drops them otherwise.", "strategy", choices=POLICIES),
]


def keeps_partial_work(values: Mapping[str, ConfigValue]) -> bool:
    """Whether the configured policy aggregates the stragglers' partial work."""
    policy = values["straggler-policy"]
    return policy == "keep" or (policy == "auto" and values["strategy"] in KEEPING_STRATEGIES)


def check_config(values: Mapping[str, ConfigValue]) -> None:
    """Refuse kept stragglers when a partial 1..E-1 epochs is impossible (E < 2)."""
    if float(values["straggler-fraction"]) > 0 and keeps_partial_work(values) \
            and int(values["local-epochs"]) < 2:
        raise ConfigError("run-config key 'straggler-fraction' is set with stragglers kept, "
                          "who train a random 1..E-1 of local-epochs E: set local-epochs >= 2")
