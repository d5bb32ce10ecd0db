"""Homomorphic aggregation: the server adds CKKS-encrypted updates it cannot read.

`HomomorphicAggregation` wraps the strategy that samples and configures the clients (the
registry puts it outside `ValidatedStrategy`, which still checks the plaintext evaluation
reports). Each client replies with `[n·w, n]` encrypted under the nodes' shared key
(`fl_app.protocol.ckks`, client side `fl_app.client.homomorphic`); the wrapper checks each
reply's structure (one ciphertext per chunk, each deserializing under the public context
with the expected number of slots, at the context's parameters, level and scale), rejects
and logs the rest (counted in `num_rejected`; the round goes on with the others), adds the
valid ones and sends the encrypted sum as the next global model. The clients decrypt it and
divide by the summed count: FedAvg weighted by examples, which no step on the server sees in
the clear.

Trust model: an honest-but-curious server (it follows the protocol but reads whatever it
holds) that gets only the public context; the clients share one secret key (so a client
that colludes with the server can read everyone's update). What the server can no longer
do: evaluate the model centrally, checkpoint or save a plaintext model, validate single
updates beyond their structure (shapes are fixed by the chunk layout, but values, norms,
finiteness and the claimed count are encrypted), or aggregate robustly (`check_config`
refuses those combinations). The run's final model is the encrypted aggregate, which a key
holder decrypts (`fl_app.cli.he_final`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from logging import WARNING
from typing import Any

from flwr.common import (
    EvaluateIns,
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy

from fl_app.protocol import ckks
from fl_app.schema import Setting
from fl_app.wire import KEY_HE_ENCRYPTED
from strategies.metrics import weighted_metrics
from strategies.validation import NUM_REJECTED
from strategies.wrapper import StrategyWrapper

SETTINGS = [
    Setting("homomorphic-encryption", str, "none",
            "ckks: clients send their updates CKKS-encrypted (TenSEAL) and the server adds "
            "ciphertexts without a secret key; none: plaintext.", "privacy",
            choices=("none", "ckks")),
    Setting("he-public-context", str, "",
            "homomorphic-encryption=ckks: the server's public TenSEAL context file (written by "
            "deploy.prepare; run_simulation.py makes a fresh key when empty).", "privacy"),
]

def incompatibilities(values: Mapping[str, Scalar]) -> list[str]:
    """Why the run config's keys other than the strategy cannot run with homomorphic
    encryption (empty: they can). Everything that needs an individual plaintext update, or a
    plaintext global model on the server, is refused; the strategy is refused by its spec
    (`strategies.combinations.homomorphic_problems`, which adds these)."""
    if values["homomorphic-encryption"] == "none":
        return []
    problems = []
    if float(values["outlier-norm-factor"]) > 0:
        problems.append("outlier-norm-factor > 0 compares individual update norms")
    if int(values["max-examples"]) > 0:
        problems.append("max-examples > 0 caps each client's example count, which is "
                        "encrypted")
    if float(values["prune-sparsity"]) > 0:
        problems.append("prune-sparsity > 0 checks each update against the mask and prunes "
                        "the plaintext model")
    if values["resume-from"]:
        problems.append("resume-from restores a plaintext checkpoint")
    compressed = [key for key in ("compress-up", "compress-down") if values[key] != "none"]
    if compressed:
        problems.append(f"{' and '.join(compressed)} would encode ciphertexts (CKKS "
                        "already fixes their size)")
    if values["patience"] or values["target"]:
        problems.append("patience/target need a metric each round, and an encrypted run has "
                        "none: the server cannot evaluate the model, and the clients send no "
                        "evaluation in the clear")
    return problems


def is_encrypted(parameters: Parameters) -> bool:
    """Whether `parameters` is an encrypted aggregate (rather than a plaintext model)."""
    return parameters.tensor_type == ckks.TENSOR_TYPE


class HomomorphicAggregation(StrategyWrapper):
    """Adds the clients' CKKS-encrypted updates; never holds a secret key.

    Round 1 sends the plaintext initial model; every later round sends the encrypted
    aggregate, with `KEY_HE_ENCRYPTED` set in the fit and evaluate config so the clients
    decrypt it first. The clients send no fit metrics and answer no evaluation in an
    encrypted run (`fl_app.client.secure_mod.private_replies_mod`); whatever metrics a reply
    still carries are averaged unweighted, since the example counts are encrypted.

    Args:
        inner: the strategy that samples and configures the clients (its `aggregate_fit`
            is never called; `aggregate_evaluate` is).
        public_context: a TenSEAL context without secret key.
        num_values: the number of weights in the model (fixes each reply's chunk layout).
        min_fit_clients: fewest valid replies that make a new aggregate.
    """

    def __init__(self, inner: Strategy, *, public_context: Any, num_values: int,
                 min_fit_clients: int) -> None:
        super().__init__(inner)
        if public_context.is_private():
            raise ValueError("the server's context must not hold a secret key")
        self.context = public_context
        self.sizes = ckks.chunk_sizes(num_values)
        self.min_fit_clients = min_fit_clients

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """The inner strategy's instructions, marked when they carry the encrypted aggregate."""
        instructions = self.inner.configure_fit(server_round, parameters, client_manager)
        return [(proxy, replace(ins, config=self._marked(ins.config, parameters)))
                for proxy, ins in instructions]

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list[tuple[ClientProxy, EvaluateIns]]:
        """The inner strategy's instructions, marked when they carry the encrypted aggregate."""
        instructions = self.inner.configure_evaluate(server_round, parameters, client_manager)
        return [(proxy, replace(ins, config=self._marked(ins.config, parameters)))
                for proxy, ins in instructions]

    @staticmethod
    def _marked(config: dict[str, Scalar], parameters: Parameters) -> dict[str, Scalar]:
        return {**config, KEY_HE_ENCRYPTED: is_encrypted(parameters)}

    def _reply(self, proxy: ClientProxy, res: FitRes, server_round: int) -> list[Any] | None:
        """The reply's ciphertexts, or None (logged) when it is not a well-formed one."""
        try:
            return ckks.ciphertexts(self.context, parameters_to_ndarrays(res.parameters),
                                    self.sizes)
        except ValueError as err:
            log(WARNING, "round %s: rejected the update of client %s: %s", server_round,
                proxy.cid, err)
            return None

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """The encrypted sum of the well-formed replies (None below `min_fit_clients`)."""
        replies = [(res, self._reply(proxy, res, server_round)) for proxy, res in results]
        valid = [(res, vectors) for res, vectors in replies if vectors is not None]
        rejected = len(replies) - len(valid)
        if not valid or len(valid) < self.min_fit_clients:
            log(WARNING, "round %s: %s well-formed encrypted update(s), fewer than "
                "min-fit-clients=%s: keeping the previous global model", server_round,
                len(valid), self.min_fit_clients)
            return None, {NUM_REJECTED: rejected}
        total: NDArrays = ckks.add_encrypted([vectors for _, vectors in valid])
        parameters = ndarrays_to_parameters(total)
        parameters.tensor_type = ckks.TENSOR_TYPE
        metrics = weighted_metrics((1, res.metrics) for res, _ in valid)
        return parameters, {**metrics, NUM_REJECTED: rejected}

    def evaluate(self, server_round: int,
                 parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """No centralized evaluation of an encrypted model (the plaintext initial one too is
        skipped, so every round's record looks alike)."""
        return None


def wrap(inner: Strategy, *, public_context_path: str, initial: Parameters,
         min_fit_clients: int) -> HomomorphicAggregation:
    """`inner` behind `HomomorphicAggregation`, with the public context read from its file."""
    num_values = sum(int(a.size) for a in parameters_to_ndarrays(initial))
    return HomomorphicAggregation(inner, public_context=ckks.load_public_context(
        public_context_path), num_values=num_values, min_fit_clients=min_fit_clients)
