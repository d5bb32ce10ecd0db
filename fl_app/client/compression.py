"""The client's side of update compression: decode the broadcast, encode the update.

`CompressingClient` wraps any Flower `Client` (a `KerasClient`, `NumPyClient.to_client()`).
It runs in the ClientApp itself, so the error-feedback residual lives in the node's Flower
`context.state`, which Flower keeps per node and run in simulation and in deployment alike
(the executor sends it back to the SuperNode with every reply). Each fit:

1. a broadcast whose `tensor_type` names a codec (`fl_app.codecs`) is decoded to float32:
   the received weights w̃;
2. the wrapped client trains from w̃ (and, under client-side DP, clips its update to C);
3. with `compress-up` in the fit config, the update Δ = w − w̃ plus the residual e of the
   previous round (`error-feedback`) is encoded; under client-side DP, Δ + e is clipped to
   C again first, so the encoded vector is always within C (clipping comes before
   encoding); the new residual is (Δ + e) − decode(encode(Δ + e)), and the fit metrics
   report both residuals' L2 norms (`compress_residual_in`, `compress_residual_out`).
   Under pruning (`prune-sparsity` in the config) Δ + e is zeroed where the round's mask
   is (`fl_app.protocol.pruning_mask.round_mask`): a residual kept from before an entry was pruned
   must not send it.

Evaluation decodes a compressed broadcast the same way. Without codec keys the wrapper
changes nothing.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from flwr.client import Client
from flwr.common import (
    ArrayRecord,
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    GetParametersIns,
    GetParametersRes,
    GetPropertiesIns,
    GetPropertiesRes,
    NDArrays,
    Parameters,
    RecordDict,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from fl_app.codecs import Codec, codec_of, up_codec
from fl_app.protocol.clipping import clip_update, l2_norm
from fl_app.protocol.pruning_mask import apply_mask, round_mask
from fl_app.wire import (
    KEY_CLIPPING_NORM,
    KEY_COMPRESS_TOP_K,
    KEY_COMPRESS_UP,
    KEY_ERROR_FEEDBACK,
)

RESIDUAL_KEY = "compression-residual"  # context.state: the error-feedback residual
RESIDUAL_IN = "compress_residual_in"  # fit metrics: L2 norm of the residual carried in
RESIDUAL_OUT = "compress_residual_out"  # fit metrics: L2 norm of the residual kept


class CompressingClient(Client):
    """Decodes a compressed broadcast for `client` and encodes its update (see the module
    doc). `state` is the node's `context.state`, where the error-feedback residual is kept
    under `RESIDUAL_KEY`."""

    def __init__(self, client: Client, state: RecordDict) -> None:
        self.client = client
        self.state = state
        self._shapes: NDArrays | None = None

    def get_properties(self, ins: GetPropertiesIns) -> GetPropertiesRes:
        """Delegate to the wrapped client."""
        return self.client.get_properties(ins)

    def get_parameters(self, ins: GetParametersIns) -> GetParametersRes:
        """Delegate to the wrapped client."""
        return self.client.get_parameters(ins)

    def _like(self) -> NDArrays:
        """Zero arrays shaped like the model (asked once, of the wrapped client)."""
        if self._shapes is None:
            res = self.client.get_parameters(GetParametersIns(config={}))
            self._shapes = [np.zeros_like(a) for a in parameters_to_ndarrays(res.parameters)]
        return self._shapes

    def _received(self, parameters: Parameters) -> Parameters:
        """`parameters` as plain float32 tensors if a codec encoded them (else unchanged);
        a compressed broadcast carries no shapes: the model's give them."""
        codec = codec_of(parameters.tensor_type)
        if codec is None:
            return parameters
        return ndarrays_to_parameters(codec.decode(list(parameters.tensors), self._like()))

    def fit(self, ins: FitIns) -> FitRes:
        """Train from the decoded broadcast; return the update encoded as the config asks."""
        received = self._received(ins.parameters)
        res = self.client.fit(FitIns(received, ins.config))
        name = str(ins.config.get(KEY_COMPRESS_UP, "none"))
        codec = up_codec(name, float(ins.config.get(KEY_COMPRESS_TOP_K, 0.01)))
        if codec is None:
            return res
        reference = parameters_to_ndarrays(received)
        weights = parameters_to_ndarrays(res.parameters)
        update = [np.asarray(w, np.float64) - np.asarray(r, np.float64)
                  for w, r in zip(weights, reference, strict=True)]
        feedback = bool(ins.config.get(KEY_ERROR_FEEDBACK, False))
        mask = round_mask(ins.config, reference) if feedback else None  # only feedback uses it
        parameters, metrics = self._encode(codec, update, ins, feedback, mask)
        return replace(res, parameters=parameters, metrics={**res.metrics, **metrics})

    def _encode(self, codec: Codec, update: NDArrays, ins: FitIns, feedback: bool,
                mask: list[np.ndarray] | None) -> tuple[Parameters, dict[str, Scalar]]:
        """The encoded update and, with error feedback, the L2 norms of the residual carried
        in from the node's state and of the one kept for the next round (zero where the
        round's pruning `mask` is)."""
        target, metrics = update, dict[str, Scalar]()
        if feedback:
            carried = self._residual(update)
            target = [u + e for u, e in zip(update, carried)]
            if mask is not None:
                target = apply_mask(target, mask)
            if KEY_CLIPPING_NORM in ins.config:  # the encoded vector stays within C
                target, _ = clip_update(target, float(ins.config[KEY_CLIPPING_NORM]))
        blobs = codec.encode([t.astype(np.float32) for t in target])
        if feedback:
            decoded = codec.decode(blobs, target)
            residual = [(t - d).astype(np.float32) for t, d in zip(target, decoded)]
            self.state[RESIDUAL_KEY] = ArrayRecord(residual)
            metrics = {RESIDUAL_IN: l2_norm(carried), RESIDUAL_OUT: l2_norm(residual)}
        return Parameters(tensors=blobs, tensor_type=codec.tensor_type), metrics

    def _residual(self, like: NDArrays) -> NDArrays:
        """The residual kept in the node's state (zeros at first, or if the model changed)."""
        if RESIDUAL_KEY in self.state.array_records:
            saved = self.state.array_records[RESIDUAL_KEY].to_numpy_ndarrays()
            if [a.shape for a in saved] == [a.shape for a in like]:
                return [a.astype(np.float64) for a in saved]
        return [np.zeros(a.shape) for a in like]

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        """Evaluate the decoded broadcast."""
        return self.client.evaluate(EvaluateIns(self._received(ins.parameters), ins.config))
