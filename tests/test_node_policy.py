"""The node's own floor (`fl_app.client.node_policy`): real mods, real Flower messages and
contexts, a real ClientApp, real CKKS keys."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.common import FitIns, ndarrays_to_parameters
from flwr.common.constant import MessageTypeLegacy
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from fl_app.app.client_app import make_client_app
from fl_app.client.node_policy import (
    NodePolicy,
    NodePolicyError,
    allowed,
    check_sources,
    node_policy_mod,
)
from fl_app.data.files import read_data_file
from fl_app.data.types import DataSettings, is_data_file
from fl_app.ml.settings import is_model_file
from fl_app.protocol import ckks
from fl_app.wire import CLIENT_KEY, KEY_CLIPPING_NORM, KEY_STATISTICS
from tests.conftest import make_config
from tests.flower_objects import fit_res

PLAIN_RUN = {"model": "mlp", "dataset": "digits", "homomorphic-encryption": "none"}
HE_RUN = {**PLAIN_RUN, "homomorphic-encryption": "ckks"}
WEIGHTS = [np.zeros((2, 3), dtype=np.float32), np.zeros(3, dtype=np.float32)]


def fit_message(config: dict | None = None, secagg: bool = False) -> Message:
    """A compat fit message (FitIns), inside a SecAgg+ stage when `secagg`."""
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(WEIGHTS),
                                                 dict(config or {})), keep_input=True)
    if secagg:
        content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord({"stage": "masked"})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def secagg_key_stage() -> Message:
    """A SecAgg+ stage that trains nothing (setup, key sharing, unmasking)."""
    content = RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({"stage": "setup"})})
    return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)


def other(kind: str) -> Message:
    return Message(content=RecordDict(), dst_node_id=1, message_type=kind)


def reply_with(arrays) -> callable:
    """A `call_next` that records the messages it answers, replying with `arrays`."""
    answered: list[Message] = []

    def call_next(msg: Message, ctxt: Context) -> Message:
        answered.append(msg)
        if msg.metadata.message_type != MessageType.TRAIN:
            return msg
        return Message(compat.fitres_to_recorddict(fit_res(arrays, 1), keep_input=False),
                       reply_to=msg)

    call_next.answered = answered  # type: ignore[attr-defined]
    return call_next


def run(node_config: dict, msg: Message, run_config: dict = PLAIN_RUN, arrays=WEIGHTS):
    """The mod on `msg` for a node with `node_config`; returns the messages it passed on."""
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                      run_config=run_config)
    call_next = reply_with(arrays)
    node_policy_mod(lambda c: c.run_config, lambda c: c.node_config)(msg, context, call_next)
    return call_next.answered


def refused(node_config: dict, msg: Message, match: str, **kwargs) -> None:
    with pytest.raises(NodePolicyError, match=match) as err:
        run(node_config, msg, **kwargs)
    assert "node 7" in str(err.value)


@pytest.mark.parametrize("node_config, match", [
    ({"require-secure": "tls"}, r"require-secure='tls' on node 7: must be one of"),
    ({"require-secure": ""}, r"require-secure='' on node 7"),
    ({"require-client-clip": 0.0}, r"require-client-clip=0.0 on node 7: must be a number > 0"),
    ({"require-client-clip": -1}, r"require-client-clip=-1"),
    ({"require-client-clip": "abc"}, r"require-client-clip='abc'"),
    ({"require-client-clip": math.nan}, r"require-client-clip=nan"),
    ({"require-client-clip": True}, r"require-client-clip=True"),
    ({"allow-models": ""}, r"allow-models='' on node 7: must be a comma-separated list"),
    ({"allow-data": " , "}, r"allow-data=' , '"),
    ({"allow-data": 3}, r"allow-data=3"),
    ({"secagg-min-clients": 1}, r"secagg-min-clients=1 on node 7: must be an integer >= 2"),
    ({"secagg-min-clients": True}, r"secagg-min-clients=True"),
    ({"secagg-min-clients": "8"}, r"secagg-min-clients='8'"),
    ({"secagg-min-clients": 5.0}, r"secagg-min-clients=5.0"),
    ({"secagg-recover-dropouts": "false"},
     r"secagg-recover-dropouts='false' on node 7: must be true or false"),
    ({"secagg-recover-dropouts": 0}, r"secagg-recover-dropouts=0"),
])
def test_a_bad_node_config_policy_refuses_every_message_naming_key_and_value(
        identity, node_config, match):
    for msg in (fit_message(), other(MessageType.EVALUATE)):
        refused(node_config, msg, match)


def test_no_policy_changes_nothing(identity):
    assert len(run({}, fit_message())) == 1
    assert len(run({}, other(MessageTypeLegacy.GET_PARAMETERS))) == 1


def test_the_secagg_keys_parse_to_the_policy():
    """As `flower-supernode --node-config` parses them (Flower's own parser)."""
    from flwr.common.config import parse_config_args

    assert NodePolicy.from_node_config({}) == NodePolicy()
    assert (NodePolicy().secagg_min_clients, NodePolicy().secagg_recover_dropouts) == (None, True)
    policy = NodePolicy.from_node_config(parse_config_args(
        ["secagg-min-clients=8 secagg-recover-dropouts=false"]))
    assert (policy.secagg_min_clients, policy.secagg_recover_dropouts) == (8, False)


def test_require_secagg_answers_only_fit_messages_inside_secagg(identity):
    node = {"require-secure": "secagg+"}
    refused(node, fit_message(), r"requires secagg\+ .* update in the clear: refused")
    assert len(run(node, fit_message(secagg=True))) == 1  # the masked stage
    assert len(run(node, secagg_key_stage())) == 1
    # evaluation passes this mod; the ClientApp's private_replies_mod refuses it
    # (tests/test_secagg_protocol.py)
    assert len(run(node, other(MessageType.EVALUATE))) == 1
    assert len(run(node, other(MessageTypeLegacy.GET_PROPERTIES))) == 1
    refused(node, other(MessageTypeLegacy.GET_PARAMETERS), "refuses get_parameters")


@pytest.fixture(scope="module")
def he_key(tmp_path_factory):
    """A real CKKS key pair: the node's secret context file and the context."""
    folder = tmp_path_factory.mktemp("he")
    ckks.write_key_pair(folder / "public.ckks", folder / "secret.ckks")
    return str(folder / "secret.ckks"), ckks.load_secret_context(folder / "secret.ckks")


def test_require_he_needs_a_ckks_run_the_nodes_key_and_a_ciphertext_reply(identity, he_key):
    path, context = he_key
    node = {"require-secure": "he", ckks.KEY_FILE_NODE_CONFIG: path}
    ciphertexts = ckks.encrypt_update(context, WEIGHTS, 5)
    assert len(run(node, fit_message(), HE_RUN, ciphertexts)) == 1
    refused(node, fit_message(), r"requires he .* in the clear", run_config=PLAIN_RUN)
    refused({"require-secure": "he"}, fit_message(), "without a key of this node",
            run_config=HE_RUN)
    refused(node, fit_message(secagg=True), "under SecAgg", run_config=HE_RUN)
    # the run says ckks, but the reply that would leave is plaintext: it does not leave
    refused(node, fit_message(), "not CKKS ciphertexts that load under its context",
            run_config=HE_RUN)
    refused(node, fit_message(), "not CKKS ciphertexts", run_config=HE_RUN,
            arrays=[np.frombuffer(b"\x00" * 64, dtype=np.uint8)])
    # a secagg+-only node refuses an HE run: another mode than the one it asked for
    refused({"require-secure": "secagg+", ckks.KEY_FILE_NODE_CONFIG: path}, fit_message(),
            "under homomorphic encryption", run_config=HE_RUN)
    assert len(run(node, other(MessageType.EVALUATE), HE_RUN)) == 1
    refused(node, other(MessageTypeLegacy.GET_PARAMETERS), "refuses get_parameters",
            run_config=HE_RUN)


def test_require_any_takes_secagg_or_he_not_the_clear(identity, he_key):
    path, context = he_key
    node = {"require-secure": "any", ckks.KEY_FILE_NODE_CONFIG: path}
    assert len(run(node, fit_message(secagg=True))) == 1
    assert len(run(node, fit_message(), HE_RUN, ckks.encrypt_update(context, WEIGHTS, 5))) == 1
    refused(node, fit_message(), r"requires any .* in the clear")


def test_require_client_clip_refuses_an_unclipped_or_looser_fit(identity):
    node = {"require-client-clip": 1.5}
    assert len(run(node, fit_message({KEY_CLIPPING_NORM: 1.5}))) == 1
    assert len(run(node, fit_message({KEY_CLIPPING_NORM: 0.1}, secagg=True))) == 1
    assert len(run(node, secagg_key_stage())) == 1  # trains nothing
    refused(node, fit_message(), "requires client-side clipping at a norm <= 1.5 .* has no "
            "client-side clipping: refused, nothing sent")
    refused(node, fit_message(secagg=True), "no client-side clipping")
    for norm in (1.6, math.inf, math.nan, 0.0, -1.0):
        refused(node, fit_message({KEY_CLIPPING_NORM: norm}), f"{KEY_CLIPPING_NORM}=")
    refused(node, other(MessageTypeLegacy.GET_PARAMETERS), "refuses get_parameters")
    assert len(run(node, other(MessageType.EVALUATE))) == 1
    # a clipped-looking message that asks for the node's data sums in the clear
    refused(node, fit_message({KEY_CLIPPING_NORM: 1.0, KEY_STATISTICS: True}),
            "asks for the node's data statistics in the clear")


@pytest.mark.parametrize("node", [{"require-client-clip": 1.5}, {"require-secure": "secagg+"}])
def test_a_protecting_node_does_not_tell_its_size_as_it_does_not_send_its_statistics(
        identity, node):
    """The training-set size `get_properties` carries under client-sampling='size' leaves
    the node in the clear, like the statistics of `standardize`: a node that requires
    protected or clipped updates refuses both; its name alone it still tells."""
    sized = {**PLAIN_RUN, "client-sampling": "size"}
    refused(node, other(MessageTypeLegacy.GET_PROPERTIES), "refuses get_properties: .* "
            "training-set size in the clear", run_config=sized)
    refused(node, fit_message({KEY_CLIPPING_NORM: 1.0, KEY_STATISTICS: True}, secagg=True),
            "data statistics in the clear")
    assert len(run(node, other(MessageTypeLegacy.GET_PROPERTIES))) == 1
    assert len(run({}, other(MessageTypeLegacy.GET_PROPERTIES), sized)) == 1


def test_allowed_sources_compare_files_after_realpath(tmp_path, monkeypatch):
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    (models / "sub" / "m.keras").write_bytes(b"")
    outside = tmp_path / "evil.keras"
    outside.write_bytes(b"")
    (models / "link.keras").symlink_to(outside)
    entries = ("mlp", "examples.keras_models:regression", str(models))
    keras_file = is_model_file
    assert allowed("mlp", entries, keras_file)
    assert allowed("examples.keras_models:regression", entries, keras_file)
    assert not allowed("examples.keras_models:other", entries, keras_file)
    assert not allowed("cnn", entries, keras_file)
    assert allowed(str(models / "sub" / "m.keras"), entries, keras_file)
    assert allowed(str(models / "sub" / ".." / "sub" / "m.keras"), entries, keras_file)
    assert not allowed(str(models / ".." / "evil.keras"), entries, keras_file)  # ../ escapes
    assert not allowed(str(models / "link.keras"), entries, keras_file)  # symlink escapes
    assert allowed(str(outside), (str(models / "link.keras"),), keras_file)  # the same file
    assert not allowed(str(models / "sub"), entries, keras_file)  # no suffix: a name
    monkeypatch.chdir(tmp_path)  # a name is never a folder, even where one has that name
    assert not allowed("models/sub/m.keras", ("models",), keras_file)
    assert allowed("models/sub/m.keras", ("./models",), keras_file)
    data = ("digits", str(tmp_path / "mine.npz"))
    assert allowed("digits", data, is_data_file) and not allowed("hf:x/y", data, is_data_file)
    assert allowed(str(tmp_path / "." / "mine.npz"), data, is_data_file)
    assert not allowed(str(tmp_path / "other.npz"), data, is_data_file)


def test_a_listed_file_named_through_a_symlink_or_dotdot_is_refused(tmp_path):
    """The check resolves the value, the loader opens it as given: a value through a symlink
    (here one another account could re-point) is refused, so what is checked is what is
    opened."""
    listed, evil = tmp_path / "listed", tmp_path / "evil"
    for folder in (listed, evil):
        (folder / "sub").mkdir(parents=True)
    np.savez(listed / "mine.npz", x=np.zeros((2, 1)), y=np.zeros(2))
    np.savez(evil / "mine.npz", x=np.ones((5, 1)), y=np.ones(5))
    hop = tmp_path / "hop"  # e.g. in a folder another local account may write
    hop.symlink_to(listed / "sub")
    (listed / "link.npz").symlink_to(listed / "mine.npz")
    policy = NodePolicy.from_node_config({"allow-data": f"{listed}/"})

    def refuses(value: str, match: str) -> None:
        with pytest.raises(NodePolicyError, match=match) as err:
            check_sources(policy, {"dataset": value}, "node 7")
        assert f"node 7 refuses run-config dataset={value!r}" in str(err.value)
        assert str(listed) not in str(err.value).replace(value, "")  # no list, no target

    through = f"{hop}/../mine.npz"  # resolves to listed/mine.npz today
    refuses(through, r"names a path through a symlink or '\.\.'; give the resolved path")
    refuses(str(listed / "link.npz"), "through a symlink")  # the file itself is a link
    refuses(f"{listed}/sub/../mine.npz", "through a symlink or '..'")  # `..` alone too
    refuses(f"{evil}/mine.npz", "does not list it")
    refuses(f"{tmp_path}/evil/../hop/../mine.npz", "through a symlink")
    check_sources(policy, {"dataset": str(listed / "mine.npz")})  # the resolved path passes
    # Why: re-pointing the link after a check would have made the loader read other data.
    hop.unlink()
    hop.symlink_to(evil / "sub")
    assert len(read_data_file(through)[1]) == 5


def test_policy_and_loader_tell_a_file_from_a_name_alike(tmp_path):
    """`.KERAS` is not a model file to the loader (nor to the run-config check), so the
    policy does not match it against a folder entry either."""
    (tmp_path / "m.keras").write_bytes(b"")
    (tmp_path / "M.KERAS").write_bytes(b"")
    policy = NodePolicy.from_node_config({"allow-models": f"{tmp_path}/",
                                          "allow-data": f"{tmp_path}/"})
    check_sources(policy, {"model": str(tmp_path / "m.keras"),
                           "dataset": str(tmp_path / "d.NPZ")})  # data suffixes: any case
    with pytest.raises(NodePolicyError, match="model=.*M.KERAS.*does not list it"):
        check_sources(policy, {"model": str(tmp_path / "M.KERAS"),
                               "dataset": str(tmp_path / "d.npz")})
    assert not is_model_file("M.KERAS") and is_data_file("d.NPZ")


@pytest.fixture
def probe_module(tmp_path, monkeypatch):
    """A model module on sys.path that leaves a mark when it is imported."""
    mark = tmp_path / "imported"
    (tmp_path / "policy_probe.py").write_text(
        f"import pathlib\npathlib.Path({str(mark)!r}).write_text('x')\n"
        "def build():\n    raise RuntimeError('never')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield mark
    sys.modules.pop("policy_probe", None)


def test_a_clientapp_refuses_an_unlisted_model_or_dataset_before_import_or_read(
        identity, tmp_path, probe_module):
    app = make_client_app()
    node = {"allow-models": "mlp", "allow-data": "digits", "data-path": str(tmp_path / "x.npz")}

    def ask(run_config: dict) -> Context:
        context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(),
                          run_config={**PLAIN_RUN, **run_config})
        return app(other(MessageTypeLegacy.GET_PROPERTIES), context)

    with pytest.raises(NodePolicyError, match=r"node 7 refuses run-config "
                       r"model='policy_probe:build': its node-config allow-models does not"):
        ask({"model": "policy_probe:build"})
    assert not probe_module.exists() and "policy_probe" not in sys.modules
    secret = tmp_path / "other-node" / "data.npz"
    with pytest.raises(NodePolicyError, match=f"dataset='{secret}'") as err:
        ask({"dataset": str(secret)})
    assert "digits" not in str(err.value)  # the node's own list is not shown


def test_the_in_process_client_checks_the_sources_before_loading():
    from fl_app.app.local_client import client_for

    def load():
        raise AssertionError("data read before the policy check")

    cfg = make_config(model="examples.keras_models:regression", dataset="diabetes")
    with pytest.raises(NodePolicyError, match="model='examples.keras_models:regression'"):
        client_for(cfg, {"allow-models": "mlp"}, load)
    with pytest.raises(NodePolicyError, match="dataset='diabetes'"):
        client_for(cfg, {"allow-data": "digits"}, load)
    check_sources(NodePolicy.from_node_config(
        {"allow-models": "mlp, examples.keras_models:regression", "allow-data": "diabetes"}), cfg)


def test_get_properties_names_no_file_of_a_deployment_node(tmp_path):
    """H: a node with its own data file tells the server no part of that file's path; an
    operator-set `client-key` or, in simulation, the partition keeps sampling stable."""
    from fl_app.app.local_client import client_for
    from fl_app.data.sources import data_source

    cfg = make_config()
    split = data_source(DataSettings.from_config(cfg)).partition(0, 5)
    path = tmp_path / "hospital-alice" / "patients-2024.npz"
    path.parent.mkdir()
    np.savez(path, x=split.x, y=split.y)
    properties = client_for(cfg, {"data-path": str(path)}).get_properties({})
    text = repr(properties)
    for part in (*path.parts[1:], path.stem, str(path)):
        assert part not in text, (part, text)
    assert CLIENT_KEY not in properties  # the server orders it by its node id
    named = client_for(cfg, {"data-path": str(path), "client-key": "node-3"})
    assert named.get_properties({}) == {CLIENT_KEY: "node-3"}
    simulated = client_for(cfg, {"partition-id": 1, "num-partitions": 5})
    assert simulated.get_properties({}) == {CLIENT_KEY: "partition 1/5 of digits"}
