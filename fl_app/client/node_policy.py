"""The node's own security floor, set by its operator in the node config: what may leave it,
which model code it imports and which data it reads. The server's run config cannot lower it.

    flower-supernode ... --node-config "require-secure='secagg+' require-client-clip=1.0
        allow-models='mlp,/srv/models/' allow-data='digits,/srv/data/node.npz'"

- `require-secure` (`secagg+`, `he` or `any`): a fit message is answered only when its update
  leaves protected. `secagg+`: the message itself is a SecAgg+ stage (Flower's
  `RECORD_KEY_CONFIGS` in its config records), so the update is masked; `he`: the run uses
  `homomorphic-encryption=ckks`, the node holds its key (`he-key-file`) and the reply is checked
  to be CKKS ciphertexts that load under its context before it goes; `any`: either.
  `get_parameters` (the node's weights in the clear) is refused; whatever the run config says, the
  ClientApp then also strips every fit reply's metrics and refuses evaluation
  (`private_replies_mod`). Under this and `require-client-clip` a fit asking for the data's
  statistics (`standardize`) is refused, and so is `get_properties` in a run with
  `client-sampling='size'` (its reply would carry the training-set size): both would leave
  the node in the clear.
- `require-client-clip` (a float C > 0): a fit message must carry client-side clipping
  (`KEY_CLIPPING_NORM`, the `dp-client-*` strategies) at a norm <= C; `get_parameters` (the
  unclipped weights) is refused.
- `allow-models`, `allow-data` (comma-separated): the run config's `model` and `dataset`
  values the node accepts; anything else is refused before it is imported or read. A `.keras`
  model or a data file (told apart by the loaders' own rules, `is_model_file`, `is_data_file`)
  matches an entry naming the same file, or a folder it lies under, both compared after
  `realpath` (no `../` or symlink leads out); every other value (builder names,
  `package.module:function`, `digits`, `hf:<id>`) must equal an entry. A file value must be
  its own resolved path: one through a symlink or a `..` is refused, since the loader opens
  the value as given and such a path could be re-pointed between the check and the load.
  Unset: anything the run config's checks accept, as before.
- `secagg-min-clients` (an int >= 2): the fewest clients of a SecAgg+ round this node takes
  part in and of a sum it helps unmask; the node uses the larger of this and the run config's
  `secagg-min-clients` (`fl_app.client.secure_mod`), so a server cannot lower it.
- `secagg-recover-dropouts` (true by default): `false` refuses every SecAgg+ unmask request
  that lists a dropped-out node, so no share of this node's pairwise-mask keys (or of its
  peers') ever leaves it: a server that splits the clients' views of who dropped out learns
  nothing beyond sums, but a round in which a client drops out after sharing its keys fails.

`node_policy_mod` enforces all of it for every message, before anything is built;
`check_sources` is also called where a node builds its client (`fl_app.app.local_client`).
A refusal is a `NodePolicyError` (a `ConfigError`): the ClientApp raises, and the server gets one
error reply naming the node, the key and its value. The errors never list the node's allowed
entries (they may name its files).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.common import MessageTypeLegacy, parameters_to_ndarrays

from fl_app.data.settings import SETTINGS as DATA_SETTINGS
from fl_app.data.types import is_data_file
from fl_app.flower_internals import RECORD_KEY_CONFIGS, ClientAppCallable, Mod
from fl_app.flower_internals import recorddict_compat as compat
from fl_app.ml.settings import SETTINGS as ML_SETTINGS
from fl_app.ml.settings import is_model_file
from fl_app.protocol import ckks
from fl_app.schema import ConfigError, Scalar
from fl_app.wire import (
    CLIENT_SAMPLING,
    FIT_CONFIG,
    KEY_CLIPPING_NORM,
    KEY_STATISTICS,
    SECAGG_MIN_CLIENTS,
)

KEY_REQUIRE_SECURE = "require-secure"
KEY_REQUIRE_CLIENT_CLIP = "require-client-clip"
KEY_ALLOW_MODELS = "allow-models"
KEY_ALLOW_DATA = "allow-data"
KEY_SECAGG_RECOVER_DROPOUTS = "secagg-recover-dropouts"
KEY_CLIENT_KEY = "client-key"  # the name this node gives the server (`public_client_key`)
SECURE_MODES = ("secagg+", "he", "any")

IsFile = Callable[[object], bool]
"""Whether a run-config value names a file (the loader's own test: `is_model_file`,
`is_data_file`)."""

# run-config key -> (the node-config list that allows it, whether a value is a file)
SOURCE_KEYS: dict[str, tuple[str, IsFile]] = {
    "model": (KEY_ALLOW_MODELS, is_model_file),
    "dataset": (KEY_ALLOW_DATA, is_data_file),
}
_DEFAULTS = {s.key: s.default for s in (*ML_SETTINGS, *DATA_SETTINGS) if s.key in SOURCE_KEYS}

ConfigOf = Callable[[Context], Mapping[str, Scalar]]
"""The run config or the node config a ClientApp uses for a message's context."""


class NodePolicyError(ConfigError):
    """A node's policy refuses a message, or the policy in its node config is invalid."""


@dataclass(frozen=True)
class NodePolicy:
    """A node's security floor, read from its node config (None: no requirement)."""

    require_secure: str | None = None
    require_client_clip: float | None = None
    allow: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # list key -> entries
    secagg_min_clients: int | None = None
    secagg_recover_dropouts: bool = True

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Scalar],
                         node: str = "this node") -> NodePolicy:
        """The policy in `node_config`; `NodePolicyError` naming the key, its value and
        `node` for a value that is not one."""
        secure = node_config.get(KEY_REQUIRE_SECURE)
        if secure is not None and secure not in SECURE_MODES:
            raise NodePolicyError(
                f"node-config {KEY_REQUIRE_SECURE}={secure!r} on {node}: must be one of "
                f"{', '.join(map(repr, SECURE_MODES))} (leave it unset for no requirement)")
        clip = node_config.get(KEY_REQUIRE_CLIENT_CLIP)
        allow = {key: _entries(node_config[key], key, node)
                 for key in (KEY_ALLOW_MODELS, KEY_ALLOW_DATA) if key in node_config}
        cohort = node_config.get(SECAGG_MIN_CLIENTS)
        if cohort is not None and (isinstance(cohort, bool) or not isinstance(cohort, int)
                                   or cohort < 2):
            raise NodePolicyError(f"node-config {SECAGG_MIN_CLIENTS}={cohort!r} on {node}: "
                                  "must be an integer >= 2 (the fewest clients of a SecAgg+ "
                                  "round this node takes part in)")
        recover = node_config.get(KEY_SECAGG_RECOVER_DROPOUTS, True)
        if not isinstance(recover, bool):
            raise NodePolicyError(f"node-config {KEY_SECAGG_RECOVER_DROPOUTS}={recover!r} on "
                                  f"{node}: must be true or false")
        return cls(secure, None if clip is None else _clip_bound(clip, node), allow, cohort,
                   recover)

    @property
    def withholds_weights(self) -> bool:
        """Whether `get_parameters` is refused (it would send the node's own weights, neither
        protected nor clipped)."""
        return self.require_secure is not None or self.require_client_clip is not None


def _clip_bound(value: Scalar, node: str) -> float:
    """`require-client-clip` as a finite float > 0."""
    try:
        bound = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        bound = math.nan
    if not (math.isfinite(bound) and bound > 0):
        raise NodePolicyError(f"node-config {KEY_REQUIRE_CLIENT_CLIP}={value!r} on {node}: "
                              "must be a number > 0 (the largest clipping norm this node "
                              "accepts)")
    return bound


def _entries(value: Scalar, key: str, node: str) -> tuple[str, ...]:
    """A comma-separated node-config list, with at least one entry."""
    entries = tuple(part.strip() for part in str(value).split(",") if part.strip())
    if not isinstance(value, str) or not entries:
        raise NodePolicyError(f"node-config {key}={value!r} on {node}: must be a "
                              "comma-separated list of at least one entry (leave it unset to "
                              "accept what the run config names)")
    return entries


def _real(path: str) -> Path:
    """`path` with `~` expanded and every symlink and `..` resolved."""
    return Path(os.path.realpath(os.path.expanduser(path)))


def resolved(path: str) -> bool:
    """Whether `path` (after `~`) is its own resolved path: no `..` and no symlink on the way,
    so the file a loader opens from it later is the one `realpath` names now (barring a
    writer into its folders)."""
    expanded = os.path.expanduser(path)
    return ".." not in Path(expanded).parts and _real(path) == Path(os.path.abspath(expanded))


def allowed(value: str, entries: tuple[str, ...], is_file: IsFile) -> bool:
    """Whether `value` is one of `entries`: for a file (`is_file`) the same file or one under
    an entry's folder (an entry with a `/`) after `realpath`, else the same string."""
    if not is_file(value):
        return value in entries
    real = _real(value)
    paths = [_real(entry) for entry in entries  # names (mlp, digits) are never folders
             if "/" in entry or is_file(entry)]
    return any(real == path or (path.is_dir() and real.is_relative_to(path)) for path in paths)


def check_sources(policy: NodePolicy, run_config: Mapping[str, Scalar],
                  node: str = "this node") -> None:
    """Refuse (`NodePolicyError`) a run config whose model or dataset the node's
    `allow-models`/`allow-data` does not list, or that names a listed file through a
    symlink or `..` (see `resolved`), before anything is imported or read."""
    for key, (list_key, is_file) in SOURCE_KEYS.items():
        if list_key not in policy.allow:
            continue
        value = str(run_config.get(key, _DEFAULTS[key]))
        if not allowed(value, policy.allow[list_key], is_file):
            raise NodePolicyError(f"{node} refuses run-config {key}={value!r}: its "
                                  f"node-config {list_key} does not list it")
        if is_file(value) and not resolved(value):
            raise NodePolicyError(f"{node} refuses run-config {key}={value!r}: it names a path "
                                  "through a symlink or '..'; give the resolved path (node-config "
                                  f"{list_key} is checked against the file that is opened)")


def he_ready(run_config: Mapping[str, Scalar], node_config: Mapping[str, Scalar]) -> bool:
    """Whether this node encrypts its update: a CKKS run and the node's own key file."""
    return (run_config.get("homomorphic-encryption", "none") == "ckks"
            and bool(node_config.get(ckks.KEY_FILE_NODE_CONFIG)))


def _how(secagg: bool, run_config: Mapping[str, Scalar],
         node_config: Mapping[str, Scalar]) -> str:
    """How a fit message would send the node's update."""
    if secagg:
        return "under SecAgg+"
    if he_ready(run_config, node_config):
        return "under homomorphic encryption"
    if run_config.get("homomorphic-encryption", "none") != "none":
        return f"without a key of this node (node-config {ckks.KEY_FILE_NODE_CONFIG})"
    return "in the clear"


def check_fit(policy: NodePolicy, msg: Message, run_config: Mapping[str, Scalar],
              node_config: Mapping[str, Scalar], node: str = "this node") -> bool:
    """Refuse (`NodePolicyError`) a fit message (any TRAIN message) that the policy does not
    allow; return whether its reply must then be checked to be CKKS ciphertexts."""
    records = msg.content.config_records
    secagg = RECORD_KEY_CONFIGS in records
    must_encrypt = False
    mode = policy.require_secure
    if mode is not None and not (secagg and mode in ("secagg+", "any")):
        must_encrypt = not secagg and mode in ("he", "any") and he_ready(run_config, node_config)
        if not must_encrypt:
            raise NodePolicyError(f"{node} requires {mode} (node-config {KEY_REQUIRE_SECURE}), "
                                  f"but this fit message would send its update "
                                  f"{_how(secagg, run_config, node_config)}: refused, nothing "
                                  "sent")
    if (mode is not None or policy.require_client_clip is not None) and FIT_CONFIG in records \
            and records[FIT_CONFIG].get(KEY_STATISTICS) is True:
        raise NodePolicyError(f"{node} requires secure aggregation or client-side clipping "
                              "(its node config), but this fit message asks for the node's "
                              "data statistics in the clear: refused, nothing sent")
    bound = policy.require_client_clip
    if bound is not None and (FIT_CONFIG in records or not secagg):  # a message that trains
        norm = records[FIT_CONFIG].get(KEY_CLIPPING_NORM) if FIT_CONFIG in records else None
        if not (isinstance(norm, (int, float)) and not isinstance(norm, bool)
                and 0 < norm <= bound):
            got = "no client-side clipping" if norm is None else f"{KEY_CLIPPING_NORM}={norm!r}"
            raise NodePolicyError(f"{node} requires client-side clipping at a norm <= {bound:g} "
                                  f"(node-config {KEY_REQUIRE_CLIENT_CLIP}), but this fit "
                                  f"message has {got}: refused, nothing sent")
    return must_encrypt


def check_encrypted_reply(reply: Message, node_config: Mapping[str, Scalar],
                          node: str = "this node") -> None:
    """Refuse (`NodePolicyError`) a fit reply whose parameters are not all CKKS ciphertexts
    that load under the node's own context (`he-key-file`; which key encrypted them cannot be
    told from the bytes)."""
    import tenseal as ts

    context = ckks.load_secret_context(str(node_config[ckks.KEY_FILE_NODE_CONFIG]))
    try:
        arrays = parameters_to_ndarrays(
            compat.recorddict_to_fitres(reply.content, keep_input=True).parameters)
        for array in map(np.asarray, arrays):
            if array.dtype != np.uint8 or array.ndim != 1:
                raise ValueError("not bytes")
            ts.ckks_vector_from(context, array.tobytes())
    except Exception:  # TenSEAL raises bare exceptions on bytes that are not a ciphertext
        raise NodePolicyError(f"{node} requires its update encrypted (node-config "
                              f"{KEY_REQUIRE_SECURE}), but its fit reply is not CKKS "
                              "ciphertexts that load under its context: refused, nothing "
                              "sent") from None


def public_client_key(node_config: Mapping[str, Scalar], source: str) -> str:
    """What a node tells the server its name is, for seeded sampling (`get_properties`):
    node-config `client-key` when set (`deploy.prepare` sets the node's name); in simulation
    its data's `source`, the partition (`partition i/N of <dataset>`, from the run's own
    config); nothing for a node with its own data file (`data-path`), whose path the server
    must not learn: the server then orders it by its Flower node id, which lasts as long as
    its SuperLink registration.
    """
    if KEY_CLIENT_KEY in node_config:
        return str(node_config[KEY_CLIENT_KEY])
    return "" if "data-path" in node_config else source


def node_policy_mod(run_config: ConfigOf, node_config: ConfigOf) -> Mod:
    """A ClientApp mod enforcing the node's policy (`NodePolicy`, from `node_config(context)`)
    on every message, against `run_config(context)`: the model and dataset sources first, then
    `get_parameters` and fit messages; an encrypted run's fit reply is checked before it goes.
    """

    def mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
        node, config, raw = f"node {ctxt.node_id}", node_config(ctxt), run_config(ctxt)
        policy = NodePolicy.from_node_config(config, node)
        check_sources(policy, raw, node)
        kind = msg.metadata.message_type
        if kind == MessageTypeLegacy.GET_PARAMETERS and policy.withholds_weights:
            raise NodePolicyError(f"{node} refuses get_parameters: its node config requires "
                                  "protected or clipped updates, and the reply would be its "
                                  "weights in the clear")
        if (kind == MessageTypeLegacy.GET_PROPERTIES and policy.withholds_weights
                and raw.get(CLIENT_SAMPLING) == "size"):
            raise NodePolicyError(f"{node} refuses get_properties: its node config requires "
                                  "protected or clipped updates, and in this run "
                                  f"({CLIENT_SAMPLING}='size') the reply would be its "
                                  "training-set size in the clear: refused, nothing sent")
        if kind != MessageType.TRAIN:
            return call_next(msg, ctxt)
        must_encrypt = check_fit(policy, msg, raw, config, node)
        reply = call_next(msg, ctxt)
        if must_encrypt and not reply.has_error():
            check_encrypted_reply(reply, config, node)
        return reply

    return mod
