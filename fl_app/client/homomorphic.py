"""The client side of homomorphic aggregation: decrypt the global model, encrypt the update.

`HomomorphicClient` wraps any `NumPyClient` (a `KerasClient`, or one with injected faults):
when the server's instructions carry the encrypted aggregate (`KEY_HE_ENCRYPTED` in the
config) it decrypts it with the node's secret context and divides by the summed example
count before the inner client sees it; its fit reply is `[n·w, n]` encrypted in chunks
(`fl_app.protocol.ckks`), with `num_examples=1` in the clear, since the count is part of the
ciphertext. The server side is `strategies.homomorphic`.

A server with the public context can forge an aggregate, e.g. a client's own reply with a
plaintext added, and watch what the node does with it. So `fit` answers a forged aggregate
exactly as an honest one, and never with an error that depends on a decrypted value: an
aggregate whose count is not a positive count (`ckks.CountError`) is replaced by the
model's initial weights before training, and trained weights that cannot be encrypted
(`ckks.encodable`: non-finite or too large, as training on forged weights may give) by the
initial weights. Both are checked before the one encryption, so the reply takes as long.
Either is logged on the node only (Flower sends a ClientApp's log nowhere else). Without
that, error-or-train would tell the server one bit per message, e.g. whether a client's
example count exceeds a threshold it picks (a binary search). Evaluation still raises on a
bad count: its loss goes to the server in the clear, so no answer would hide it, and a run
under homomorphic encryption refuses evaluation anyway (`private_replies_mod`).
"""

from __future__ import annotations

from collections.abc import Mapping
from logging import WARNING
from typing import Any

from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar
from flwr.common.logger import log

from fl_app.client.wrapper import ClientWrapper
from fl_app.protocol import ckks
from fl_app.schema import ConfigError
from fl_app.wire import KEY_HE_ENCRYPTED


class HomomorphicClient(ClientWrapper):
    """`inner` with CKKS-encrypted replies and decrypted instructions.

    Args:
        inner: the client that trains and evaluates on plaintext weights.
        secret_context: the node's TenSEAL context with the secret key all nodes share.
    """

    def __init__(self, inner: NumPyClient, secret_context: Any) -> None:
        super().__init__(inner)
        self.context = secret_context

    def _plaintext(self, parameters: NDArrays, config: Mapping[str, Scalar],
                   initial: NDArrays) -> NDArrays:
        """`parameters`, decrypted when encrypted, shaped like the `initial` weights."""
        if not config.get(KEY_HE_ENCRYPTED, False):
            return parameters
        return ckks.decrypt_average(self.context, parameters, initial)

    def fit(self, parameters: NDArrays,
            config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train on the decrypted global model; reply with the encrypted scaled update. A
        forged aggregate gets the same kind of reply (see the module)."""
        initial = self.inner.get_parameters({})
        try:
            plaintext = self._plaintext(parameters, config, initial)
        except ckks.CountError as err:
            log(WARNING, "homomorphic encryption: %s (a forged aggregate): training from the "
                "initial weights instead, and answering as usual", err)
            plaintext = initial
        weights, num_examples, metrics = self.inner.fit(plaintext, config)
        if not ckks.encodable(weights, num_examples):
            log(WARNING, "homomorphic encryption: the trained weights are not finite or too "
                "large to encrypt: sending the initial weights instead")
            weights = initial
        return ckks.encrypt_update(self.context, weights, num_examples), 1, metrics

    def evaluate(self, parameters: NDArrays,
                 config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        """Evaluate the decrypted global model."""
        return self.inner.evaluate(
            self._plaintext(parameters, config, self.inner.get_parameters({})), config)


def with_encryption(client: NumPyClient, cfg: Mapping[str, Scalar],
                    node_config: Mapping[str, Scalar]) -> NumPyClient:
    """`client` behind `HomomorphicClient` when the run uses `homomorphic-encryption=ckks`
    (the key file comes from this node's config, never from the run config), else as is."""
    if cfg["homomorphic-encryption"] == "none":
        return client
    path = node_config.get(ckks.KEY_FILE_NODE_CONFIG)
    if not path:
        raise ConfigError(f"homomorphic-encryption=ckks needs node config "
                          f"'{ckks.KEY_FILE_NODE_CONFIG}': the node's secret key file "
                          "(deploy.prepare writes one per node)")
    return HomomorphicClient(client, ckks.load_secret_context(str(path)))
