"""SecAgg+ against a deviating server, and what a protected run's replies carry: the app's
real ClientApp (its mods, real Keras clients on digits) answering Flower's real
`SecAggPlusWorkflow`, run by the app's `SecAggPlusFit`, over an in-process Grid that hands
each message to its node's ClientApp as a SuperNode would (a raised exception becomes the
reply's error). A deviating server is that Grid rewriting the unmask stage's lists on the
way out.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from uuid import uuid4

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.clientapp import ClientApp
from flwr.common import EvaluateIns, FitIns, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.compat.common import recorddict_compat as compat
from flwr.server import Server
from flwr.server.client_manager import SimpleClientManager
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key

from fl_app.app.client_app import make_client_app
from fl_app.app.server_app import secagg_workflow
from fl_app.client.secure_mod import private_replies_mod, secure_aggregation_mod
from fl_app.data.types import DataSettings
from fl_app.schema import ConfigError
from fl_app.server.secagg import FitOutcome, SecAggPlusFit
from fl_app.wire import FIT_METRICS
from strategies.compose import compose
from strategies.context import StrategyContext
from strategies.weighted_fedavg import WeightedFedAvg
from tests.conftest import make_config
from tests.flower_objects import IdleProxy

NODES = (11, 12, 13)
VICTIM = 12
SECURE = dict(secure_aggregation="secagg+", examples_cap_factor=0.0, num_server_rounds=1)
Rewrite = Callable[[Message], None]


pytestmark = pytest.mark.usefixtures("identity")


class LocalGrid:
    """A Grid delivering each pushed message to its node's ClientApp in this process (a
    copy, as a SuperNode receives its own); `rewrite` (the deviating server) may change a
    message before it leaves. Keeps each delivery's stage, node and reply."""

    def __init__(self, apps: dict[int, tuple[ClientApp, Context]], rewrite: Rewrite) -> None:
        self.apps = apps
        self.rewrite = rewrite
        self.log: list[tuple[str | None, int, Message]] = []
        self.replies: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each message now; its id, as Flower's grid returns it."""
        ids = []
        for original in messages:
            original.metadata.__dict__["_message_id"] = str(uuid4())
            msg = copy.deepcopy(original)
            self.rewrite(msg)
            app, context = self.apps[msg.metadata.dst_node_id]
            stage = _stage(msg)  # before Flower's mod takes it out of the message
            try:
                reply = app(msg, context)
            except Exception as err:  # noqa: BLE001 - a SuperNode replies with the error
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"),
                                reply_to=msg)
            self.log.append((stage, msg.metadata.dst_node_id, reply))
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        """The replies to `message_ids`."""
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def log_replies(self) -> list[Message]:
        """Every reply, in delivery order."""
        return [reply for _, _, reply in self.log]

    def stage_replies(self, stage: str) -> dict[int, Message]:
        """The replies to SecAgg+ `stage`'s messages, by node."""
        return {node: reply for sent, node, reply in self.log if sent == stage}


def _stage(msg: Message) -> str | None:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if configs is None else configs.get(Key.STAGE)


def _contexts(run_config: dict, nodes: tuple[int, ...] = NODES,
              node_config: dict | None = None) -> dict[int, Context]:
    return {nid: Context(run_id=1, node_id=nid, node_config={
        "partition-id": i, "num-partitions": len(nodes), **(node_config or {})},
                         state=RecordDict(), run_config=run_config)
            for i, nid in enumerate(nodes)}


def _prepared_round(cfg, rewrite: Rewrite = lambda msg: None, server_min: int | None = None,
                    app: ClientApp | None = None, nodes: tuple[int, ...] = NODES,
                    node_config: dict | None = None,
                    ) -> tuple[Callable[[], FitOutcome], LocalGrid, dict[int, Context]]:
    """One SecAgg+ round of the app's server over the app's ClientApp (or `app`) on `nodes`
    (each with `node_config` added to its own), ready to run; `server_min` overrides the
    server's `secagg-min-clients`."""
    from fl_app.data.sources import data_source
    from fl_app.ml.trainer import TrainSettings, trainer_for

    app = app or make_client_app(fixed_config=cfg)
    contexts = _contexts({}, nodes, node_config)
    grid = LocalGrid({nid: (app, contexts[nid]) for nid in nodes}, rewrite)
    manager = SimpleClientManager()
    for nid in nodes:
        proxy = IdleProxy(str(nid))
        proxy.node_id = nid
        manager.register(proxy)
    server = Server(client_manager=manager, strategy=WeightedFedAvg(
        min_fit_clients=len(nodes), min_available_clients=len(nodes)))
    train = TrainSettings.from_config(cfg)
    server.parameters = ndarrays_to_parameters(
        trainer_for(train, data_source(DataSettings.from_config(cfg)).spec).get_weights())
    server_context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(),
                             run_config={})
    fit = SecAggPlusFit(secagg_workflow(cfg), grid, server_context,
                        min_clients=server_min or int(cfg["secagg-min-clients"]))
    return lambda: fit(server, 1), grid, contexts


def _app_round(cfg, rewrite: Rewrite = lambda msg: None, server_min: int | None = None,
               ) -> tuple[FitOutcome, LocalGrid, dict[int, Context]]:
    """`_prepared_round` with the app's ClientApp, run."""
    run, grid, contexts = _prepared_round(cfg, rewrite, server_min)
    return run(), grid, contexts


def _unmask_lists(msg: Message, change: Callable[[list[int], list[int]], None]) -> None:
    """Apply `change` to an unmask message's alive and dropped lists (in place)."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or configs.get(Key.STAGE) != Stage.UNMASK:
        return
    active, dead = list(configs[Key.ACTIVE_NODE_ID_LIST]), list(configs[Key.DEAD_NODE_ID_LIST])
    change(active, dead)
    configs[Key.ACTIVE_NODE_ID_LIST], configs[Key.DEAD_NODE_ID_LIST] = active, dead


def _both_lists(msg: Message) -> None:
    """The deviating server: lists VICTIM (alive) also as dropped out."""
    _unmask_lists(msg, lambda active, dead: dead.append(VICTIM))


class KnownUpdate(NumPyClient):
    """A client whose update is known: +0.25 on every weight, from 10 examples."""

    def fit(self, parameters, config):
        return [p + 0.25 for p in parameters], 10, {}


def _shares(replies: Iterable[Message]) -> list[tuple[int, bytes]]:
    """Every (node id, share) the unmask replies carry."""
    found = []
    for reply in replies:
        if not reply.has_error():
            configs = reply.content.config_records[RECORD_KEY_CONFIGS]
            found += list(zip(configs[Key.NODE_ID_LIST], configs[Key.SHARE_LIST]))
    return found


# ---- honest and deviating servers

@pytest.fixture(scope="module")
def toy_cfg():
    """SecAgg+ on 3 clients: the documented way is to lower secagg-min-clients."""
    return make_config(secagg_min_clients=3, **SECURE)


def test_an_honest_round_unmasks_the_sum_and_no_reply_carries_a_count_or_metrics(toy_cfg):
    (parameters, _, (results, failures)), grid, _ = _app_round(toy_cfg)
    assert parameters is not None and failures == [] and len(results) == 3
    assert len(_shares(grid.stage_replies(Stage.UNMASK).values())) == 9  # 3 clients x 3 seed shares
    for _, res in results:  # the clients' fit replies, as the server received them
        assert res.num_examples == 1 and res.metrics == {}


def test_a_server_listing_a_client_alive_and_dropped_gets_no_share(toy_cfg):
    (parameters, _, (_, failures)), grid, _ = _app_round(toy_cfg, _both_lists)
    replies = list(grid.stage_replies(Stage.UNMASK).values())
    assert len(replies) == 3 and all(r.has_error() for r in replies)
    assert all("both as alive and as dropped" in r.error.reason for r in replies)
    assert _shares(replies) == []  # not one share left a client
    assert parameters is None and len(failures) == 3  # the round halted, nothing unmasked


def test_control_flowers_mod_alone_hands_that_server_both_secrets_of_the_victim(toy_cfg):
    """Without the app's check, the same server rebuilds the victim's private-mask seed
    and its pairwise-mask key from the unmask replies: with its masked vector, its update."""
    flower_only = ClientApp(client_fn=lambda context: KnownUpdate().to_client(),
                            mods=[secaggplus_mod])
    run, grid, contexts = _prepared_round(toy_cfg, _both_lists, app=flower_only)
    with pytest.raises(ValueError):  # Flower's server then fails on the mixed shares
        run()
    seed_shares, key_shares = [], []
    for reply in grid.stage_replies(Stage.UNMASK).values():
        configs = reply.content.config_records[RECORD_KEY_CONFIGS]
        victim = [s for nid, s in zip(configs[Key.NODE_ID_LIST], configs[Key.SHARE_LIST])
                  if nid == VICTIM]
        seed_shares.append(victim[0])  # listed alive first: its seed share
        key_shares.append(victim[1])  # then dropped: its key share
    state = SecAggPlusState(**contexts[VICTIM].state.config_records[RECORD_KEY_STATE])
    assert combine_shares(seed_shares) == state.rd_seed
    assert combine_shares(key_shares) == state.sk1


@pytest.mark.parametrize("change, refusal", [
    (lambda active, dead: active.append(999), "holds no shares of"),
    (lambda active, dead: (active.remove(VICTIM), dead.append(VICTIM)),
     "does not list this node"),
    (lambda active, dead: active.append(active[0]), "lists a node twice"),
])
def test_a_client_refuses_an_unmask_request_naming_strangers_itself_dropped_or_twice(
        toy_cfg, change, refusal):
    def deviate(msg: Message) -> None:
        if msg.metadata.dst_node_id == VICTIM:
            _unmask_lists(msg, change)

    _, grid, _ = _app_round(toy_cfg, deviate)
    by_node = grid.stage_replies(Stage.UNMASK)
    assert by_node[VICTIM].has_error() and refusal in by_node[VICTIM].error.reason
    assert _shares([by_node[VICTIM]]) == []
    assert not any(by_node[n].has_error() for n in NODES if n != VICTIM)


def test_a_client_refuses_to_unmask_a_sum_of_fewer_than_the_minimum(toy_cfg):
    """The server drops a live client from every list: the sum would hold two updates."""
    def drop(msg: Message) -> None:
        if msg.metadata.dst_node_id != VICTIM:
            _unmask_lists(msg, lambda active, dead: (active.remove(VICTIM), dead.append(VICTIM)))

    (parameters, _, _), grid, _ = _app_round(toy_cfg, drop)
    replies = grid.stage_replies(Stage.UNMASK)
    for nid in NODES:
        if nid != VICTIM:
            assert "fewer than secagg-min-clients (3)" in replies[nid].error.reason
    assert _shares([replies[n] for n in NODES if n != VICTIM]) == []
    assert parameters is None


# ---- the minimum cohort

def test_the_server_does_not_start_a_round_below_the_minimum(toy_cfg):
    cfg = make_config(**SECURE)  # secagg-min-clients: 5 by default
    (parameters, _, (results, failures)), grid, _ = _app_round(cfg)
    assert parameters is None and results == [] and grid.log == []
    assert sorted(f.cid for f in failures) == [str(n) for n in NODES]
    assert all("3 clients sampled, fewer than secagg-min-clients (5)" in str(f)
               for f in failures)


def test_clients_refuse_a_round_below_their_runs_minimum_when_the_server_starts_one():
    cfg = make_config(**SECURE)  # the clients' run says 5; the server starts 3 anyway
    (parameters, _, (_, failures)), grid, _ = _app_round(cfg, server_min=2)
    replies = list(grid.stage_replies(Stage.SETUP).values())
    assert len(replies) == 3 and all(r.has_error() for r in replies)
    assert all("the round has 3 clients, fewer than secagg-min-clients (5)" in r.error.reason
               for r in replies)
    assert parameters is None and all("fewer than secagg-min-clients" in str(f)
                                      for f in failures)


def test_a_nodes_own_minimum_binds_whatever_the_run_config_says(toy_cfg):
    """Node-config secagg-min-clients=4: the run's 3 (the server's choice) does not lower it."""
    run, grid, _ = _prepared_round(toy_cfg, node_config={"secagg-min-clients": 4})
    parameters, _, _ = run()
    replies = list(grid.stage_replies(Stage.SETUP).values())
    assert len(replies) == 3 and all(
        "the round has 3 clients, fewer than secagg-min-clients (4)" in r.error.reason
        for r in replies)
    assert parameters is None and grid.stage_replies(Stage.UNMASK) == {}


def test_a_client_refuses_to_mask_with_fewer_peers_than_the_minimum(toy_cfg):
    """The server forwards the victim one peer's shares (Flower's own check, the threshold of
    2, lets it pass): its masked vector could then be unmasked in a sum of two."""
    def starve(msg: Message) -> None:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if msg.metadata.dst_node_id == VICTIM and configs is not None \
                and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS:
            for key in (Key.SOURCE_LIST, Key.CIPHERTEXT_LIST):
                configs[key] = configs[key][:1]

    _, grid, _ = _app_round(toy_cfg, starve)
    replies = grid.stage_replies(Stage.COLLECT_MASKED_VECTORS)
    assert "forwards this node the shares of 1 peers" in replies[VICTIM].error.reason
    assert "fewer than secagg-min-clients (3)" in replies[VICTIM].error.reason
    assert not any(replies[n].has_error() for n in NODES if n != VICTIM)


def test_a_client_refuses_a_threshold_of_half_the_shares_or_fewer(toy_cfg):
    def half(msg: Message) -> None:
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        if configs is not None and configs.get(Key.STAGE) == Stage.SETUP:
            msg.content.config_records[RECORD_KEY_CONFIGS] = ConfigRecord(
                {**configs, Key.SHARE_NUMBER: 4, Key.THRESHOLD: 2})

    _, grid, _ = _app_round(toy_cfg, half)
    replies = grid.stage_replies(Stage.SETUP).values()
    assert len(replies) == 3 and all("threshold of 2 of 4 shares is not above half"
                                     in r.error.reason for r in replies)


@pytest.mark.parametrize("overrides, named", [
    (dict(secagg_min_clients=1), "secagg-min-clients"),
    (dict(secagg_reconstruction_threshold=0.5), "above half the shares"),
    (dict(secagg_num_shares=6.0, secagg_reconstruction_threshold=3.0), "above half"),
    (dict(monitor="distributed_accuracy"), "no distributed evaluation"),
])
def test_config_refuses_small_minimums_minority_thresholds_and_distributed_monitors(
        overrides, named):
    with pytest.raises(ConfigError, match=named):
        make_config(**{**SECURE, **overrides})


def test_homomorphic_runs_refuse_a_distributed_monitor():
    with pytest.raises(ConfigError, match="no distributed evaluation"):
        make_config(homomorphic_encryption="ckks", monitor="distributed_accuracy")


# ---- split views: each client gets its own consistent-looking lists

SPLIT_NODES = tuple(range(11, 20))  # 9 clients: threshold 5 of 9 shares, minimum 5 (defaults)
SPLIT_PEERS = [n for n in SPLIT_NODES if n != VICTIM]
SPLIT_S, SPLIT_P = SPLIT_PEERS[:4], SPLIT_PEERS[4:]  # t-1 peers whose mask keys it wants; rest


def _split_lists(node: int) -> tuple[list[int], list[int]]:
    """The alive and dropped lists the split-view server sends `node` (not the victim): the
    victim alive with enough others (outside S) to pass every check; S, but the
    responder, dropped."""
    active = [VICTIM, node, *SPLIT_P[:3]] if node in SPLIT_S else [VICTIM, *SPLIT_P]
    return active, [n for n in SPLIT_NODES if n not in active]


def _split_view(msg: Message) -> None:
    """The server forwards the victim only S's share ciphertexts, so the victim masks with
    S alone; then asks each other client to unmask with `_split_lists`. Each request passes
    the client's checks and Flower's; only a consistency round (Bell et al.), which
    Flower's SecAgg+ lacks, would show the clients their lists differ."""
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    node = msg.metadata.dst_node_id
    if configs is None or node == VICTIM and configs.get(Key.STAGE) == Stage.UNMASK:
        return
    if node == VICTIM and configs.get(Key.STAGE) == Stage.COLLECT_MASKED_VECTORS:
        keep = [i for i, src in enumerate(configs[Key.SOURCE_LIST]) if src in SPLIT_S]
        for key in (Key.SOURCE_LIST, Key.CIPHERTEXT_LIST):
            configs[key] = [configs[key][i] for i in keep]
    elif configs.get(Key.STAGE) == Stage.UNMASK:
        configs[Key.ACTIVE_NODE_ID_LIST], configs[Key.DEAD_NODE_ID_LIST] = _split_lists(node)


def _split_round(node_config: dict, rewrite: Rewrite = _split_view
                 ) -> tuple[Callable[[], FitOutcome], LocalGrid, dict[int, Context]]:
    """The split-view server's (or `rewrite`'s) round over the app's SecAgg+ mod on
    KnownUpdate clients, each node with `node_config`; its run config empty (the defaults)."""
    app = ClientApp(client_fn=lambda context: KnownUpdate().to_client(),
                    mods=[secure_aggregation_mod(lambda context: True)])
    cfg = make_config(secure_aggregation="secagg+", examples_cap_factor=0.0,
                      num_server_rounds=1)
    return _prepared_round(cfg, rewrite, app=app, nodes=SPLIT_NODES,
                           node_config=node_config)


def test_nodes_that_recover_no_dropouts_give_a_split_view_server_no_mask_key():
    run, grid, _ = _split_round({"secagg-recover-dropouts": False})
    parameters, _, _ = run()
    replies = grid.stage_replies(Stage.UNMASK)
    others = [replies[n] for n in SPLIT_PEERS]
    assert all("recovers no dropout (node-config secagg-recover-dropouts=false)"
               in r.error.reason for r in others)
    assert _shares(others) == []  # not one share of a seed or a key left them
    assert parameters is None


def test_nodes_that_recover_no_dropouts_complete_a_round_without_dropouts():
    run, grid, _ = _split_round({"secagg-recover-dropouts": False}, lambda msg: None)
    parameters, _, (results, failures) = run()
    assert parameters is not None and failures == [] and len(results) == len(SPLIT_NODES)
    assert not any(reply.has_error() for reply in grid.log_replies())


def test_control_with_dropout_recovery_a_split_view_server_unmasks_one_client():
    """The remaining limit, with the default secagg-recover-dropouts=true: the server
    rebuilds the victim's seed and S's pairwise-mask keys, and unmasks the victim alone."""
    run, grid, contexts = _split_round({})
    with pytest.raises(ValueError):  # Flower's server then fails on the lists it sent
        run()
    seed_shares, key_shares = [], {j: [] for j in SPLIT_S}
    for node in SPLIT_PEERS:
        configs = grid.stage_replies(Stage.UNMASK)[node].content.config_records[
            RECORD_KEY_CONFIGS]
        active, _ = _split_lists(node)
        for i, (nid, share) in enumerate(zip(configs[Key.NODE_ID_LIST],
                                             configs[Key.SHARE_LIST])):
            if i < len(active) and nid == VICTIM:
                seed_shares.append(share)
            elif i >= len(active) and nid in key_shares:
                key_shares[nid].append(share)
    state = {n: SecAggPlusState(**contexts[n].state.config_records[RECORD_KEY_STATE])
             for n in SPLIT_NODES}
    victim = state[VICTIM]
    seed = combine_shares(seed_shares[:victim.threshold])
    masked = grid.stage_replies(Stage.COLLECT_MASKED_VECTORS)[VICTIM].content.config_records[
        RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
    vector = [bytes_to_ndarray(array) for array in masked]
    dims = [array.shape for array in vector]
    vector = parameters_subtraction(vector, pseudo_rand_gen(seed, victim.mod_range, dims))
    for j in SPLIT_S:
        key = generate_shared_key(bytes_to_private_key(combine_shares(
            key_shares[j][:victim.threshold])), bytes_to_public_key(victim.pk1))
        mask = pseudo_rand_gen(key, victim.mod_range, dims)
        vector = (parameters_subtraction if VICTIM > j else parameters_addition)(vector, mask)
    _, vector = factor_extract(parameters_mod(vector, victim.mod_range))
    update = dequantize(vector, victim.clipping_range, victim.target_range)
    # KnownUpdate adds 0.25 from 10 examples; secagg-max-weight is 1000
    assert all(np.allclose(u, 0.25 * 10 / victim.max_weight, atol=1e-4) for u in update)


# ---- a protected run's other replies

def _message(message_type: str, cfg) -> Message:
    from fl_app.data.sources import data_source
    from fl_app.ml.trainer import TrainSettings, trainer_for
    from fl_app.wire import round_config

    settings = DataSettings.from_config(cfg)
    weights = trainer_for(TrainSettings.from_config(cfg), data_source(settings).spec).get_weights()
    parameters = ndarrays_to_parameters(weights)
    content = (compat.fitins_to_recorddict(FitIns(parameters, round_config(cfg, 1)), True)
               if message_type == MessageType.TRAIN else compat.evaluateins_to_recorddict(
                   EvaluateIns(parameters, round_config(cfg, 1)), True))
    msg = Message(content=content, dst_node_id=NODES[0], message_type=message_type)
    msg.metadata.__dict__["_message_id"] = str(uuid4())
    return msg


@pytest.mark.parametrize("protection", [dict(secure_aggregation="secagg+"),
                                        dict(homomorphic_encryption="ckks")])
def test_a_protected_runs_client_refuses_evaluation(protection):
    plain = make_config(examples_cap_factor=0.0)
    cfg = make_config(examples_cap_factor=0.0, **protection)
    context = _contexts({})[NODES[0]]
    reply = make_client_app(fixed_config=plain)(_message(MessageType.TRAIN, plain), context)
    metrics = compat.recorddict_to_fitres(reply.content, keep_input=True).metrics
    assert "data_rows" in metrics  # the control: a plain run reports them
    assert make_client_app(fixed_config=plain)(_message(MessageType.EVALUATE, plain),
                                               context).content
    app = make_client_app(fixed_config=cfg)
    if "secure_aggregation" in protection:  # a plaintext fit is refused outright there
        with pytest.raises(RuntimeError, match="refusing to send the update in the clear"):
            app(_message(MessageType.TRAIN, cfg), context)
    with pytest.raises(RuntimeError, match="refusing to send this node's evaluation"):
        app(_message(MessageType.EVALUATE, cfg), context)


def test_a_protected_runs_fit_reply_passes_through_the_mod_without_metrics():
    """The mod alone on a real fit reply from the app's client (HE's ClientApp would add
    its encryption below it, which this test leaves out)."""
    cfg = make_config(examples_cap_factor=0.0)
    context = _contexts({})[NODES[0]]
    app = make_client_app(fixed_config=cfg)
    for protected, empty in ((False, False), (True, True)):
        reply = private_replies_mod(lambda ctxt, p=protected: p)(
            _message(MessageType.TRAIN, cfg), context, app)
        metrics = compat.recorddict_to_fitres(reply.content, keep_input=True).metrics
        assert (metrics == {}) == empty


def test_no_secagg_reply_carries_metrics_even_when_the_run_config_claims_plaintext(toy_cfg):
    """The server drives SecAgg+ stages under a run config that says secure-aggregation=
    'none' (which it chose): the masked replies still carry no metrics."""
    claimed = make_config(secagg_min_clients=3, examples_cap_factor=0.0, num_server_rounds=1)
    assert claimed["secure-aggregation"] == "none"
    run, grid, _ = _prepared_round(toy_cfg, app=make_client_app(fixed_config=claimed))
    parameters, _, (results, failures) = run()
    assert parameters is not None and failures == [] and len(results) == 3
    for reply in grid.log_replies():
        assert not reply.has_error()
        assert dict(reply.content.config_records.get(FIT_METRICS, {})) == {}


def test_a_node_requiring_secure_updates_refuses_evaluation_whatever_the_run_config_says():
    claimed = make_config(examples_cap_factor=0.0)  # secure-aggregation='none'
    context = _contexts({})[NODES[0]]
    evaluate = _message(MessageType.EVALUATE, claimed)
    assert make_client_app(fixed_config=claimed)(evaluate, context).content  # the control
    for mode in ("secagg+", "he", "any"):
        app = make_client_app(fixed_config=claimed, node_config={"require-secure": mode})
        with pytest.raises(RuntimeError, match=r"this node \(node-config require-secure\) "
                           "protects .* refusing to send this node's evaluation"):
            app(_message(MessageType.EVALUATE, claimed), context)


def test_the_servers_strategy_samples_nobody_for_evaluation_in_a_protected_run():
    from tests.dp_rounds import client_manager, zeros

    for cfg, sampled in ((make_config(examples_cap_factor=0.0), 4),
                         (make_config(**SECURE), 0)):
        strategy = compose(StrategyContext(
            cfg=cfg, initial_parameters=ndarrays_to_parameters(zeros())))
        assert len(strategy.configure_evaluate(1, ndarrays_to_parameters(zeros()),
                                               client_manager(4))) == sampled
