"""The client half of SecAgg+: Flower's `secaggplus_mod`, installed on every node, active
only for the protocol's messages.

A ClientApp's mods are fixed when it is built, before any run config is known, so the app
always installs `secure_aggregation_mod`: a fit message that carries SecAgg+ stage configs
goes through Flower's `secaggplus_mod`; a plain fit message passes through untouched —
unless the node's run says `secure-aggregation` is on, then the client refuses to send its
update in the clear. Evaluation messages always pass through.

Inside the protocol the client masks its *update* w − w_global (not its weights: updates are
small, so the clipping range can be tight and the quantization fine), after checking it has
the global model's shapes and only finite values; a client that fails the check raises, and
the round treats it as a dropout. Under distributed DP (`dp_noise_std` in the fit config) the
reply carries no metrics at all, whatever the client reported. `secaggplus_mod` then scales the update by n/max-weight,
quantizes it and adds the masks; the server unmasks only the sum.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import NDArrays, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import MessageTypeLegacy
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fl_app.wire import KEY_DP_NOISE_STD

SecureRequired = Callable[[Context], bool]
"""Whether this node's run requires secure aggregation (then plaintext fit is refused)."""


def checked_update(weights: NDArrays, sent: NDArrays) -> NDArrays:
    """The update `weights - sent` (float64); raises ValueError if the arrays' count or
    shapes differ from the global model's or a value is not finite."""
    if len(weights) != len(sent) or any(w.shape != s.shape for w, s in zip(weights, sent)):
        raise ValueError(
            f"refusing to mask an update of {len(weights)} arrays "
            f"{[w.shape for w in weights]}: the global model has {len(sent)} arrays "
            f"{[s.shape for s in sent]}")
    update = [np.asarray(w, dtype=np.float64) - np.asarray(s, dtype=np.float64)
              for w, s in zip(weights, sent)]
    if not all(np.all(np.isfinite(u)) for u in update):
        raise ValueError("refusing to mask an update with non-finite values")
    return update


def _as_update(call_next: ClientAppCallable) -> ClientAppCallable:
    """`call_next` whose fit reply carries the update instead of the new weights."""

    def fit(msg: Message, ctxt: Context) -> Message:
        reply = call_next(msg, ctxt)
        if reply.has_error():
            return reply
        ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        res = compat.recorddict_to_fitres(reply.content, keep_input=True)
        res.parameters = ndarrays_to_parameters(checked_update(
            parameters_to_ndarrays(res.parameters), parameters_to_ndarrays(ins.parameters)))
        if KEY_DP_NOISE_STD in ins.config:  # distributed DP: only the masked update leaves
            res.metrics = {}
        return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)

    return fit


def secure_aggregation_mod(required: SecureRequired) -> Mod:
    """A ClientApp mod: SecAgg+ fit messages through `secaggplus_mod` (masking the update),
    plain fit messages refused when `required(context)`, everything else passed on."""

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            return secaggplus_mod(msg, ctxt, _as_update(call_next))
        if required(ctxt):
            raise RuntimeError("secure-aggregation is on for this run, but the server sent a "
                               "plaintext fit round: refusing to send the update in the clear")
        return call_next(msg, ctxt)

    return mod


def withhold_weights_mod(protected: SecureRequired) -> Mod:
    """A ClientApp mod: refuses `get_parameters` when `protected(context)` (a SecAgg+ or
    homomorphic-encryption run), since the reply would be this node's own weights (its last
    fit's result) in the clear; everything else passed on."""

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type == MessageTypeLegacy.GET_PARAMETERS and protected(ctxt):
            raise RuntimeError("this run protects the clients' updates (secure aggregation or "
                               "homomorphic encryption): refusing to send this node's weights "
                               "in the clear")
        return call_next(msg, ctxt)

    return mod
