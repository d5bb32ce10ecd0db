"""Update compression around any strategy: the server's side of `fl_app.codecs`.

`CompressedStrategy` sits outermost (the registry puts it around `ValidatedStrategy`), so
every strategy inside it, ours, Flower's or DP, sees decoded float32 weights only. Each
round:

1. down (`compress-down`): the global model w is encoded once (fp16, or int8 per output
   channel rounded to nearest); the inner strategy is configured with the decoded w̃,
   exactly what the clients will start from, and every client's `FitIns` carries the
   encoded blobs instead (a `Parameters` whose `tensor_type` names the codec);
2. up (`compress-up`): the fit config tells clients the codec, the top-k fraction and
   whether to keep an error-feedback residual (`fl_app.client.compression` encodes the
   update Δ = w_client − w̃);
3. each compressed result is decoded to w̃ + Δ̂ before the inner strategy sees it; one that
   does not decode (wrong count, length or index) is rejected, logged and counted in
   `num_rejected`. Uncompressed results pass unchanged.

Order with differential privacy: client-side clipping (`dp-client-*`) happens on the client
before encoding, and the server-side clipping and noise of every DP wrapper after decoding.
A codec's rounding can lift a clipped update's norm a little above C (fp16, int8): the
decoder scales such an update back to C when the excess is within the codec's stated bound
(`Codec.overshoot`), so DP's re-clip and the client's clipped bit stay exact; a larger
excess is left to the DP wrapper, which clips and logs it.
"""

from __future__ import annotations

from dataclasses import replace
from logging import WARNING

import numpy as np
from flwr.common import (
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

from fl_app.codecs import (
    DOWN_CODECS,
    UP_CODECS,
    CodecError,
    codec_of,
    down_codec,
    up_codec,
)
from fl_app.protocol.clipping import clip_update, l2_norm
from fl_app.schema import ConfigError, Setting
from fl_app.wire import (
    KEY_CLIPPING_NORM,
    KEY_COMPRESS_TOP_K,
    KEY_COMPRESS_UP,
    KEY_ERROR_FEEDBACK,
)
from strategies.validation import NUM_REJECTED
from strategies.wrapper import StrategyWrapper

SETTINGS = [
    Setting("compress-up", str, "none",
            "Client -> server update codec: 'none', 'fp16', 'int8' (unbiased stochastic "
            "rounding, one scale per tensor), 'int8-channel' (one scale per output channel) "
            "or 'top-k' (the compress-top-k fraction of the update's largest entries).",
            "compression", choices=UP_CODECS),
    Setting("compress-top-k", float, 0.01,
            "top-k: the fraction of the update's entries sent (over all layers).",
            "compression", low=0.0, high=1.0, low_open=True),
    Setting("error-feedback", bool, False,
            "Clients keep what encoding lost (in the node's context.state) and add it to the "
            "next round's update.", "compression"),
    Setting("compress-down", str, "none",
            "Server -> client broadcast codec: 'none', 'fp16' or 'int8' (per output channel, "
            "rounded to nearest).", "compression", choices=DOWN_CODECS),
]


def check_config(values: dict[str, Scalar]) -> None:
    """Refuse error feedback without an update codec (there would be nothing to feed back)."""
    if values["error-feedback"] and values["compress-up"] == "none":
        raise ConfigError("run-config key 'error-feedback' needs an update codec: set "
                          "compress-up to fp16, int8, int8-channel or top-k")


def within_clip_norm(update: NDArrays, clip_norm: float, overshoot: float) -> NDArrays:
    """`update` scaled back to `clip_norm` if a codec's rounding lifted its norm above it by
    at most the codec's `overshoot` bound (a larger excess is the DP wrapper's to clip and
    log)."""
    norm = l2_norm(update)
    if norm <= clip_norm or norm > clip_norm + overshoot:
        return update
    return [u.astype(np.float32) for u in clip_update(update, clip_norm)[0]]


class CompressedStrategy(StrategyWrapper):
    """Encodes the broadcast and decodes client updates around `inner` (see the module doc).

    Args:
        inner: the strategy that sees decoded float32 weights only.
        up: the update codec clients use ("none", "fp16", "int8", "int8-channel", "top-k").
        down: the broadcast codec ("none", "fp16", "int8").
        top_k: the fraction of entries top-k sends.
        error_feedback: clients keep a residual of what encoding lost.
    """

    def __init__(self, inner: Strategy, *, up: str = "none", down: str = "none",
                 top_k: float = 0.01, error_feedback: bool = False) -> None:
        super().__init__(inner)
        up_codec(up, top_k)  # refuse unknown names at construction
        self.down = down_codec(down)
        self.up, self.top_k, self.error_feedback = up, top_k, error_feedback
        self._sent: dict[str, NDArrays] = {}  # client id -> the weights it received
        self._clip_norm: float | None = None  # the round's client clip norm, if any

    def __repr__(self) -> str:
        down = self.down.name if self.down else "none"
        return f"CompressedStrategy({self.inner!r}, up={self.up}, down={down})"

    def _broadcast(self, parameters: Parameters) -> tuple[Parameters, Parameters]:
        """The parameters the clients decode to (w̃) and the blobs that travel."""
        if self.down is None:
            return parameters, parameters
        arrays = parameters_to_ndarrays(parameters)
        blobs = self.down.encode(arrays)
        decoded = [d.astype(a.dtype) for d, a in zip(self.down.decode(blobs, arrays), arrays)]
        return (ndarrays_to_parameters(decoded),
                Parameters(tensors=blobs, tensor_type=self.down.tensor_type))

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        """Configure `inner` with the weights the clients will decode; send them encoded,
        with the update codec in the fit config."""
        received, encoded = self._broadcast(parameters)
        instructions = self.inner.configure_fit(server_round, received, client_manager)
        codec_keys: dict[str, Scalar] = {} if self.up == "none" else {
            KEY_COMPRESS_UP: self.up, KEY_COMPRESS_TOP_K: self.top_k,
            KEY_ERROR_FEEDBACK: self.error_feedback}
        arrays: dict[int, NDArrays] = {}  # decoded once per distinct Parameters object
        self._sent, self._clip_norm, out = {}, None, []
        for proxy, ins in instructions:
            sent = ins.parameters
            if id(sent) not in arrays:
                arrays[id(sent)] = parameters_to_ndarrays(sent)
            self._sent[proxy.cid] = arrays[id(sent)]
            if KEY_CLIPPING_NORM in ins.config:
                self._clip_norm = float(ins.config[KEY_CLIPPING_NORM])
            wire = encoded if sent is received else self._broadcast(sent)[1]
            out.append((proxy, FitIns(wire, {**ins.config, **codec_keys})))
        return out

    def _decoded(self, proxy: ClientProxy, res: FitRes) -> FitRes | str:
        """`res` with its update decoded into weights, or why it must be rejected."""
        codec = codec_of(res.parameters.tensor_type)
        if codec is None:
            return res
        reference = self._sent.get(proxy.cid)
        if reference is None:
            return "a compressed update from a client not sent this round's model"
        blobs = list(res.parameters.tensors)
        update = codec.decode(blobs, reference)
        if self._clip_norm is not None:
            update = within_clip_norm(update, self._clip_norm, codec.overshoot(blobs, reference))
        weights = [(np.asarray(r, np.float64) + u).astype(r.dtype)
                   for r, u in zip(reference, update)]
        return replace(res, parameters=ndarrays_to_parameters(weights))

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Decode every compressed update (rejecting those that do not decode), then let
        `inner` aggregate. The results passed in are left as they are (new `FitRes`)."""
        decoded, rejected = [], 0
        for proxy, res in results:
            try:
                out = self._decoded(proxy, res)
            except CodecError as err:
                out = str(err)
            if isinstance(out, str):
                log(WARNING, "round %s: rejected update from client %s: %s", server_round,
                    proxy.cid, out)
                rejected += 1
                continue
            decoded.append((proxy, out))
        parameters, metrics = self.inner.aggregate_fit(server_round, decoded, failures)
        if rejected:
            metrics = {**metrics, NUM_REJECTED: int(metrics.get(NUM_REJECTED, 0)) + rejected}
        return parameters, metrics
