"""The client side of homomorphic aggregation: decrypt the global model, encrypt the update.

`HomomorphicClient` wraps any `NumPyClient` (a `KerasClient`, or one with injected faults):
when the server's instructions carry the encrypted aggregate (`KEY_HE_ENCRYPTED` in the
config) it decrypts it with the node's secret context and divides by the summed example
count before the inner client sees it; its fit reply is `[n·w, n]` encrypted in chunks
(`strategies.ckks`), with `num_examples=1` in the clear, since the count is part of the
ciphertext. The server side is `strategies.homomorphic`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.client import NumPyClient
from flwr.common import NDArrays, Scalar

from fl_app.client.wrapper import ClientWrapper
from fl_app.schema import ConfigError
from fl_app.wire import KEY_HE_ENCRYPTED
from strategies import ckks


class HomomorphicClient(ClientWrapper):
    """`inner` with CKKS-encrypted replies and decrypted instructions.

    Args:
        inner: the client that trains and evaluates on plaintext weights.
        secret_context: the node's TenSEAL context with the secret key all nodes share.
    """

    def __init__(self, inner: NumPyClient, secret_context: Any) -> None:
        super().__init__(inner)
        self.context = secret_context

    def _plaintext(self, parameters: NDArrays, config: Mapping[str, Scalar]) -> NDArrays:
        if not config.get(KEY_HE_ENCRYPTED, False):
            return parameters
        return ckks.decrypt_average(self.context, parameters, self.inner.get_parameters({}))

    def fit(self, parameters: NDArrays,
            config: dict[str, Scalar]) -> tuple[NDArrays, int, dict[str, Scalar]]:
        """Train on the decrypted global model; reply with the encrypted scaled update."""
        weights, num_examples, metrics = self.inner.fit(self._plaintext(parameters, config),
                                                        config)
        return ckks.encrypt_update(self.context, weights, num_examples), 1, metrics

    def evaluate(self, parameters: NDArrays,
                 config: dict[str, Scalar]) -> tuple[float, int, dict[str, Scalar]]:
        """Evaluate the decrypted global model."""
        return self.inner.evaluate(self._plaintext(parameters, config), config)


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
