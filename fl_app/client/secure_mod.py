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
the round treats it as a dropout. `secaggplus_mod` then scales the update by n/max-weight,
quantizes it and adds the masks; the server unmasks only the sum, whose quantized weight
factor is the round's total example count. The reply's own example count, which Flower's
protocol leaves in the clear, is replaced by 1.

Before Flower's mod answers a stage, `check_secagg_request` refuses (an error reply, nothing
of this node's secrets sent) what only a deviating or careless server asks: a cohort below
`secagg-min-clients` (the larger of the run config's and the node config's, at least 2), a
reconstruction threshold of half the shares or fewer, a masked vector summed with fewer peers
than that minimum, and an unmask request that lists a node both alive and dropped, names a
node this one holds no shares of, lists this node itself as dropped, or would unmask a sum of
fewer than `secagg-min-clients`; with node-config `secagg-recover-dropouts=false`, also any
unmask request that lists a dropped node (no pairwise-mask key share ever leaves).

Every reply to a SecAgg+ stage goes without fit metrics and with an example count of 1,
whatever the run config says. In a protected run (SecAgg+ or homomorphic encryption, or a
node whose node config sets `require-secure`) `private_replies_mod` strips every fit reply's
metrics and refuses evaluation, and `withhold_weights_mod` refuses `get_parameters`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NoReturn

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.client.mod import secaggplus_mod
from flwr.common import (
    MessageTypeLegacy,
    NDArrays,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from fl_app.client.node_policy import ConfigOf, NodePolicy
from fl_app.flower_internals import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    ClientAppCallable,
    Mod,
    SecAggPlusState,
    Stage,
    check_configs,
)
from fl_app.flower_internals import SecAggPlusKey as Key
from fl_app.flower_internals import recorddict_compat as compat
from fl_app.wire import (
    FIT_COUNT,
    FIT_METRICS,
    SECAGG_MIN_CLIENTS,
    SECAGG_MIN_CLIENTS_DEFAULT,
)

SecureRequired = Callable[[Context], bool]
"""Whether this node's run requires secure aggregation (then plaintext fit is refused)."""

_PROTECTED = ("this run or this node (node-config require-secure) protects the clients' "
              "updates (secure aggregation or homomorphic encryption)")


def min_clients_for(run_config: Mapping[str, Scalar], policy: NodePolicy) -> int:
    """The fewest clients a SecAgg+ round may sum for this node: the larger of the run
    config's (its default when absent) and the node config's (`policy`)
    `secagg-min-clients`, and never below 2."""
    run_min = int(run_config.get(SECAGG_MIN_CLIENTS, SECAGG_MIN_CLIENTS_DEFAULT))
    return max(run_min, policy.secagg_min_clients or 2, 2)


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
        return Message(compat.fitres_to_recorddict(res, keep_input=False), reply_to=msg)

    return fit


def _refuse(why: str) -> NoReturn:
    """Raise the ValueError that refuses this SecAgg+ request, saying `why`."""
    raise ValueError(f"refusing this SecAgg+ request: {why}")


def _config_int(configs: ConfigRecord, key: str) -> int:
    """`configs[key]` as an int: Flower's `check_configs`, run first, has checked that it is
    one (the TypeError here is for a caller that skipped it)."""
    value = configs[key]
    if not isinstance(value, int):
        raise TypeError(f"SecAgg+ config '{key}' must be an int, got {type(value).__name__}")
    return int(value)


def _config_ints(configs: ConfigRecord, key: str) -> list[int]:
    """`configs[key]` as a list of ints (Flower's `check_configs`, run first, lets only
    falsy non-int items through, which `int` turns into 0 or refuses with a ValueError)."""
    value = configs[key]
    if not isinstance(value, list):
        raise TypeError(f"SecAgg+ config '{key}' must be a list, got {type(value).__name__}")
    return [int(item) for item in value]


def _check_setup(configs: ConfigRecord, min_clients: int) -> None:
    """Refuse a setup stage whose cohort is below `min_clients` or whose threshold is not
    above half the shares."""
    sampled = _config_int(configs, Key.SAMPLE_NUMBER)
    shares = _config_int(configs, Key.SHARE_NUMBER)
    threshold = _config_int(configs, Key.THRESHOLD)
    if sampled < min_clients:
        _refuse(f"the round has {sampled} clients, fewer than {SECAGG_MIN_CLIENTS} ({min_clients})")
    if 2 * threshold <= shares:
        _refuse(f"a reconstruction threshold of {threshold} of {shares} shares is not above "
                "half: a server could ask some clients for this node's mask seed and the "
                "others for its mask key (raise secagg-reconstruction-threshold)")


def _check_unmask(configs: ConfigRecord, state: SecAggPlusState, min_clients: int,
                  recover_dropouts: bool) -> None:
    """Refuse an unmask request that could reveal one client's update (see
    `check_secagg_request`)."""
    active = _config_ints(configs, Key.ACTIVE_NODE_ID_LIST)
    dead = _config_ints(configs, Key.DEAD_NODE_ID_LIST)
    held = set(state.rd_seed_share_dict)  # this node's own share and those it received
    if dead and not recover_dropouts:
        _refuse(f"the unmask request lists {len(dead)} node(s) as dropped out, and this node "
                "recovers no dropout (node-config secagg-recover-dropouts=false): it sends no "
                "share of a pairwise-mask key")
    if len(set(active)) != len(active) or len(set(dead)) != len(dead):
        _refuse("the unmask request lists a node twice")
    if set(active) & set(dead):
        _refuse(f"the unmask request lists node(s) {sorted(set(active) & set(dead))} both as "
                "alive and as dropped out (their two masks' shares would reveal their update)")
    if unknown := sorted((set(active) | set(dead)) - held):
        _refuse(f"the unmask request names node(s) {unknown} this node holds no shares of")
    if state.nid not in active:
        _refuse("the unmask request does not list this node, which is answering it, as alive")
    if len(active) < min_clients:
        _refuse(f"the unmasked sum would have {len(active)} clients, fewer than "
                f"{SECAGG_MIN_CLIENTS} ({min_clients})")


def check_secagg_request(configs: ConfigRecord, state: SecAggPlusState, min_clients: int,
                         recover_dropouts: bool = True) -> None:
    """Raise ValueError if answering this SecAgg+ stage request (`configs`, its stage under
    `Key.STAGE`) could weaken this node's protection: a round (setup's sample count, the
    share-keys stage's peers or the collect stage's forwarded shares, this node included)
    below `min_clients`, a threshold not above half the shares, or an unmask request whose
    lists overlap, repeat a node, name a node `state` (Flower's `SecAggPlusState` of this
    node) holds no shares of, leave this node out of the alive list, hold fewer than
    `min_clients` alive nodes or, unless `recover_dropouts`, list any dropped node. Flower's
    own type checks (`check_configs`) run first."""
    stage = configs.get(Key.STAGE)
    if stage not in Stage.all():
        return  # Flower's mod refuses it with its own error
    check_configs(str(stage), ConfigRecord({k: v for k, v in configs.items() if k != Key.STAGE}))
    if stage == Stage.SETUP:
        _check_setup(configs, min_clients)
    elif stage == Stage.SHARE_KEYS and len(configs) - 1 < min_clients:
        _refuse(f"the round shares keys among {len(configs) - 1} clients, fewer than "
                f"{SECAGG_MIN_CLIENTS} ({min_clients})")
    elif stage == Stage.COLLECT_MASKED_VECTORS \
            and (peers := len(set(_config_ints(configs, Key.SOURCE_LIST)))) + 1 < min_clients:
        _refuse(f"the server forwards this node the shares of {peers} peers: its masked vector "
                f"could be unmasked in a sum of fewer than {SECAGG_MIN_CLIENTS} ({min_clients}) "
                "clients")
    elif stage == Stage.UNMASK:
        _check_unmask(configs, state, min_clients, recover_dropouts)


def _strip_metrics(reply: Message) -> None:
    """Empty a fit reply's metrics record, if it has one."""
    if not reply.has_error() and FIT_METRICS in reply.content.config_records:
        reply.content.config_records[FIT_METRICS] = ConfigRecord({})


def _secagg_state(ctxt: Context) -> SecAggPlusState:
    """This node's SecAgg+ state as `secaggplus_mod` keeps it in `ctxt.state` (empty if none)."""
    record = ctxt.state.config_records.get(RECORD_KEY_STATE, ConfigRecord({}))
    return SecAggPlusState(**record)


def secure_aggregation_mod(required: SecureRequired,
                           run_config: ConfigOf = lambda ctxt: ctxt.run_config,
                           node_config: ConfigOf = lambda ctxt: ctxt.node_config) -> Mod:
    """A ClientApp mod: SecAgg+ fit messages checked (`check_secagg_request`, with the
    minimum of `min_clients_for` and the node's `secagg-recover-dropouts`, from
    `run_config(context)` and `node_config(context)`) and then answered by `secaggplus_mod`
    (masking the update; the reply's fit metrics stripped and its example count replaced by
    1, whatever the run config says), plain fit messages refused when `required(context)`,
    everything else passed on."""

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type != MessageType.TRAIN:
            return call_next(msg, ctxt)
        if RECORD_KEY_CONFIGS in msg.content.config_records:
            configs = msg.content.config_records[RECORD_KEY_CONFIGS]
            policy = NodePolicy.from_node_config(node_config(ctxt), f"node {ctxt.node_id}")
            check_secagg_request(configs, _secagg_state(ctxt),
                                 min_clients_for(run_config(ctxt), policy),
                                 policy.secagg_recover_dropouts)
            reply = secaggplus_mod(msg, ctxt, _as_update(call_next))
            # Flower's mod returns the ClientApp's reply with only its arrays cleared: its
            # metrics and count would go per client and in the clear (the count is inside
            # the masked sum)
            _strip_metrics(reply)
            if not reply.has_error() and FIT_COUNT in reply.content.metric_records:
                reply.content.metric_records[FIT_COUNT] = MetricRecord({"num_examples": 1})
            return reply
        if required(ctxt):
            raise RuntimeError("secure-aggregation is on for this run, but the server sent a "
                               "plaintext fit round: refusing to send the update in the clear")
        return call_next(msg, ctxt)

    return mod


def withhold_weights_mod(protected: SecureRequired) -> Mod:
    """A ClientApp mod: refuses `get_parameters` when `protected(context)` (a SecAgg+ or
    homomorphic-encryption run, or a node that requires either), since the reply would be
    this node's own weights (its last fit's result) in the clear; everything else passed on.
    """

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if msg.metadata.message_type == MessageTypeLegacy.GET_PARAMETERS and protected(ctxt):
            raise RuntimeError(f"{_PROTECTED}: refusing to send this node's weights in the "
                               "clear")
        return call_next(msg, ctxt)

    return mod


def private_replies_mod(protected: SecureRequired) -> Mod:
    """A ClientApp mod: when `protected(context)` (a SecAgg+ or homomorphic-encryption run,
    or a node that requires either: node-config `require-secure`), strips every fit reply's
    metrics (data rows, local steps, data warnings, loss, timing: per client and in the
    clear) and refuses evaluation (its loss and validation-set size would be per client and
    in the clear); everything else, and plain runs, passed on."""

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        if not protected(ctxt):
            return call_next(msg, ctxt)
        if msg.metadata.message_type == MessageType.EVALUATE:
            raise RuntimeError(f"{_PROTECTED}: refusing to send this node's evaluation (loss, "
                               "validation-set size) in the clear")
        reply = call_next(msg, ctxt)
        if msg.metadata.message_type == MessageType.TRAIN:
            _strip_metrics(reply)
        return reply

    return mod
