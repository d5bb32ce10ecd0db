"""SecAgg+ (secure-aggregation=secagg+): refused combinations, distributed DP, and real
SecAgg+ rounds on Flower's simulation engine.

The simulation tests run the app's server (`serve`: FederatedServer with Flower's
SecAggPlusWorkflow as its fit round) against clients behind the app's
`secure_aggregation_mod` that send known updates, so the plaintext weighted average is
known exactly. The strategy is wrapped in a recorder: under SecAgg+ it must only ever receive
the aggregate, in plaintext it receives each update (the control that shows the recorder
would see one).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from flwr.app import Context, Message
from flwr.client import NumPyClient
from flwr.clientapp import ClientApp
from flwr.common import (
    Code,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.serverapp import ServerApp

import run_simulation
from fl_app.app.server_app import serve, server_components
from fl_app.client.secure_mod import (
    checked_update,
    secure_aggregation_mod,
    withhold_weights_mod,
)
from fl_app.data.types import DataSettings
from fl_app.schema import ConfigError
from fl_app.wire import KEY_CLIPPING_NORM, KEY_DP_NOISE_STD, SERVER_ROUND
from strategies.accounting import PrivacyAccountant
from strategies.combinations import needs_individual_updates
from strategies.distributed_dp import DistributedDPFixedClipping
from strategies.validated import ValidatedStrategy
from strategies.weighted_fedavg import WeightedFedAvg
from strategies.wrapper import StrategyWrapper
from tests.conftest import make_config
from tests.dp_rounds import client_manager, zeros

SECURE = dict(secure_aggregation="secagg+", examples_cap_factor=0.0)
TOY_COHORT = dict(secagg_min_clients=3, secagg_reconstruction_threshold=0.75)
"""4 clients, 3 after a dropout: below the default minimum (5), and 0.6 of 4 shares (2) is
not above half; the documented way to run such a toy cohort."""


# ---- refusing what cannot work on an aggregate

@pytest.mark.parametrize("overrides, named", [
    (dict(strategy="krum"), "strategy='krum'"),
    (dict(strategy="fedmedian"), "strategy='fedmedian'"),
    (dict(strategy="fedtrimmedavg"), "strategy='fedtrimmedavg'"),
    (dict(strategy="bulyan"), "strategy='bulyan'"),
    (dict(strategy="fednova"), "strategy='fednova'"),
    (dict(strategy="qfedavg"), "strategy='qfedavg'"),
    (dict(strategy="dp-fixed"), "strategy='dp-fixed'"),
    (dict(strategy="dp-client-adaptive"), "strategy='dp-client-adaptive'"),
    (dict(outlier_norm_factor=3.0), "outlier-norm-factor=3.0"),
    (dict(examples_cap_factor=3.0), "examples-cap-factor=3.0"),
    (dict(max_examples=500), "max-examples=500"),
])
def test_secagg_refuses_checks_that_need_individual_updates(overrides, named):
    with pytest.raises(ConfigError, match="secure-aggregation='secagg\\+'") as err:
        make_config(**{**SECURE, **overrides})
    assert named in str(err.value)
    make_config(**{**overrides, "examples_cap_factor": overrides.get("examples_cap_factor", 3.0)})


def test_plain_strategies_and_client_side_dp_work_on_an_aggregate():
    for strategy in ("weighted-fedavg", "fedavg", "fedadam", "fedprox", "dp-client-fixed"):
        assert needs_individual_updates(make_config(strategy=strategy, **SECURE)) == []


@pytest.mark.parametrize("shares, threshold", [(2.0, 1.0), (5.5, 3.0), (5.0, 5.0), (0.8, 3.0)])
def test_secagg_refuses_share_counts_flower_cannot_run(shares, threshold):
    with pytest.raises(ConfigError, match="secagg-"):
        make_config(secagg_num_shares=shares, secagg_reconstruction_threshold=threshold,
                    **SECURE)


# ---- the client's own check before it masks

def test_a_client_refuses_to_mask_a_misshaped_or_non_finite_update():
    sent = zeros()
    assert [u.dtype for u in checked_update([s + 1 for s in sent], sent)] == [np.float64] * 2
    with pytest.raises(ValueError, match="global model has 2 arrays"):
        checked_update(sent[:1], sent)
    with pytest.raises(ValueError, match="non-finite"):
        checked_update([s + np.nan for s in sent], sent)


def _train_message() -> Message:
    from flwr.app import RecordDict
    from flwr.app.message_type import MessageType

    return Message(content=RecordDict(), dst_node_id=1, message_type=MessageType.TRAIN)


@pytest.fixture
def mod_call(identity):
    """A node's context, the messages a mod passed on, and the `call_next` that records
    them (a Message needs a task's identity: `identity`)."""
    answered: list = []

    def call_next(msg, ctxt):
        answered.append(msg)
        return msg

    return Context(run_id=1, node_id=1, node_config={}, state=None, run_config={}), answered, \
        call_next


def test_a_secure_client_refuses_a_plaintext_fit_round(mod_call):
    context, answered, call_next = mod_call
    with pytest.raises(RuntimeError, match="refusing to send the update in the clear"):
        secure_aggregation_mod(lambda ctxt: True)(_train_message(), context, call_next)
    assert answered == []
    secure_aggregation_mod(lambda ctxt: False)(_train_message(), context, call_next)
    assert len(answered) == 1  # off: a plaintext round passes through untouched


def test_a_protected_run_never_sends_a_nodes_weights_in_the_clear(mod_call):
    """`get_parameters` would return the node's last fit result, unmasked: refused under
    SecAgg+ and HE; other messages, and plain runs, pass through."""
    from flwr.app import RecordDict

    context, answered, call_next = mod_call

    def ask() -> Message:
        return Message(content=RecordDict(), dst_node_id=1, message_type="get_parameters")

    with pytest.raises(RuntimeError, match="refusing to send this node's weights"):
        withhold_weights_mod(lambda ctxt: True)(ask(), context, call_next)
    assert answered == []
    withhold_weights_mod(lambda ctxt: True)(_train_message(), context, call_next)
    withhold_weights_mod(lambda ctxt: False)(ask(), context, call_next)
    assert len(answered) == 2


def test_a_distributed_dp_client_clips_noises_and_reports_only_one_example():
    from fl_app.app.local_client import client_with
    from fl_app.data.node_data import load_client
    from fl_app.data.sources import data_source
    from fl_app.ml.trainer import TrainSettings, trainer_for
    from fl_app.protocol.clipping import l2_norm, model_update
    from fl_app.wire import round_config

    cfg = make_config()
    settings = DataSettings.from_config(cfg)
    train = TrainSettings.from_config(cfg)
    start = [w.copy() for w in trainer_for(train, data_source(settings).spec).get_weights()]
    node = {"partition-id": 1, "num-partitions": 10}
    client = client_with(cfg, node, load_client(settings, node))  # the KerasClient (the ClientApp's
    # private_replies_mod strips every fit metric of a protected run, timing included)
    config = {**round_config(cfg, 1), KEY_CLIPPING_NORM: 0.5}
    clipped, n, metrics = client.fit(start, config)
    assert n > 1 and metrics and l2_norm(model_update(clipped, start)) <= 0.5 + 1e-4
    noised, n, metrics = client.fit(start, {**config, KEY_DP_NOISE_STD: 0.01})
    assert (n, metrics) == (1, {})
    noise = np.concatenate([u.ravel() for u in model_update(noised, clipped)])
    assert np.std(noise) == pytest.approx(0.01, rel=0.1)  # same seed: only the noise differs


# ---- distributed DP: the clients' noise, the server's share only for dropouts

def _distributed(noise: float) -> DistributedDPFixedClipping:
    inner = WeightedFedAvg(min_fit_clients=1, min_available_clients=1,
                           initial_parameters=ndarrays_to_parameters(zeros()))
    return DistributedDPFixedClipping(inner, noise_multiplier=noise, clipping_norm=1.0,
                                      accountant=PrivacyAccountant(), min_fit_clients=1)


def _secure_round(strategy, updates, server_round: int = 1, num_sampled: int = 4):
    """A round as SecAgg+ plays it: of `num_sampled` clients, the first len(updates) answer,
    and each result carries the same plain mean of their updates (unit weights)."""
    validated = ValidatedStrategy(strategy, min_fit_clients=0)
    instructions = validated.configure_fit(server_round, ndarrays_to_parameters(zeros()),
                                           client_manager(num_sampled))
    mean = ndarrays_to_parameters(
        [np.mean(layer, axis=0).astype(np.float32) for layer in zip(*updates)])
    results = [(proxy, FitRes(Status(Code.OK, ""), mean, 1, {}))
               for proxy, _ in instructions[:len(updates)]]
    parameters, metrics = validated.aggregate_fit(server_round, results, [])
    return parameters_to_ndarrays(parameters), metrics


def test_distributed_dp_sends_each_client_its_share_of_the_noise():
    strategy = _distributed(noise=2.0)
    instructions = strategy.configure_fit(1, ndarrays_to_parameters(zeros()), client_manager(4))
    for _, ins in instructions:
        assert ins.config[KEY_CLIPPING_NORM] == 1.0
        assert ins.config[KEY_DP_NOISE_STD] == pytest.approx(2.0 * 1.0 / math.sqrt(4))


def test_distributed_dp_releases_the_sum_over_m_and_charges_the_round():
    rng = np.random.default_rng(3)
    updates = [[rng.uniform(-0.1, 0.1, a.shape).astype(np.float32) for a in zeros()]
               for _ in range(3)]  # 3 of the 4 sampled clients answered
    strategy = _distributed(noise=0.0)
    new, metrics = _secure_round(strategy, updates)
    expected = [np.sum(layer, axis=0) / 4 for layer in zip(*updates)]  # zero for the dropout
    for got, want in zip(new, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert len(strategy.accountant.rounds) == 1 and metrics["dp_server_noise_std"] == 0.0


def test_distributed_dp_server_adds_only_the_dropped_clients_noise():
    strategy = _distributed(noise=1.0)
    # every client answered (here with zero updates and no noise of their own): the server
    # adds nothing, the clients' noise is all there is
    new, metrics = _secure_round(strategy, [zeros()] * 4, server_round=1)
    assert metrics["dp_server_noise_std"] == 0.0
    assert all(not np.any(layer) for layer in new)
    # one of 4 dropped out: the server adds its share, std z*C*sqrt(1/4), over m = 4
    new, metrics = _secure_round(strategy, [zeros()] * 3, server_round=2)
    expected = 1.0 * math.sqrt(1 / 4) / 4
    assert metrics["dp_server_noise_std"] == pytest.approx(expected)
    assert np.std(np.concatenate([a.ravel() for a in new])) == pytest.approx(expected, rel=0.2)
    assert len(strategy.accountant.rounds) == 2


def test_a_halted_secagg_round_names_every_client_it_was_sent_to():
    """A workflow that sends the round and stops before any aggregate (as SecAgg+ does when
    more clients drop out than the threshold allows): no new model, every client a failure."""
    from flwr.app import RecordDict
    from flwr.server import Server

    from fl_app.server.secagg import SecAggPlusFit

    server = Server(client_manager=client_manager(4),
                    strategy=WeightedFedAvg(min_fit_clients=4, min_available_clients=4))
    server.parameters = ndarrays_to_parameters(zeros())

    def halting(grid, legacy) -> None:
        legacy.strategy.configure_fit(1, server.parameters, legacy.client_manager)

    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    parameters, metrics, (results, failures) = SecAggPlusFit(halting, object(), context,
                                                             min_clients=4)(server, 1)
    assert parameters is None and metrics == {} and results == []
    assert sorted(f.cid for f in failures) == ["c0", "c1", "c2", "c3"]
    assert all("halted" in str(f) for f in failures)


# ---- real SecAgg+ rounds on Flower's simulation engine

NUM_CLIENTS = 4
DROPOUT_ROUND = 2  # client 0 raises in fit (after sharing its keys): a real dropout


def _examples(pid: int) -> int:
    return 100 + 50 * pid


def _update(pid: int, server_round: int, shapes) -> list[np.ndarray]:
    rng = np.random.default_rng([pid, server_round])
    return [rng.uniform(-0.5, 0.5, shape) for shape in shapes]


class KnownUpdateClient(NumPyClient):
    """Sends the global model plus a fixed update (by partition id and round)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def fit(self, parameters, config):
        server_round = int(config[SERVER_ROUND])
        if self.pid == 0 and server_round == DROPOUT_ROUND:
            raise RuntimeError("client 0 drops out")
        update = _update(self.pid, server_round, [p.shape for p in parameters])
        return ([(p + u).astype(p.dtype) for p, u in zip(parameters, update)],
                _examples(self.pid), {})

    def evaluate(self, parameters, config):
        return 0.0, 1, {}


class Recorder(StrategyWrapper):
    """Records the global model sent and the results every `aggregate_fit` receives."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.sent, self.received = {}, {}

    def configure_fit(self, server_round, parameters, client_manager):
        self.sent[server_round] = parameters_to_ndarrays(parameters)
        return self.inner.configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        self.received[server_round] = [
            (parameters_to_ndarrays(res.parameters), res.num_examples) for _, res in results]
        return self.inner.aggregate_fit(server_round, results, failures)


def _simulate(tmp_path, secure: str) -> tuple[Recorder, dict]:
    from flwr.simulation import run_simulation

    cfg = make_config(num_server_rounds=2, fraction_evaluate=0.0, min_fit_clients=3,
                      min_available_clients=NUM_CLIENTS, secure_aggregation=secure,
                      examples_cap_factor=0.0, out_dir=str(tmp_path), **TOY_COHORT)
    components = server_components(cfg)
    recorder = Recorder(components.server.strategy)
    components.server.strategy = recorder
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context: Context) -> None:
        serve(grid, context, cfg, components)

    client_app = ClientApp(
        client_fn=lambda context: KnownUpdateClient(
            int(context.node_config["partition-id"])).to_client(),
        mods=[secure_aggregation_mod(lambda context: secure != "none", lambda context: cfg)])
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=NUM_CLIENTS,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    return recorder, json.loads((tmp_path / "history.json").read_text())


def quantization_bound(cfg, counts: list[int], max_update: float) -> float:
    """Per coordinate, |SecAgg+ aggregate - weighted mean| <= k(2r + 2max|u|)/(Q·Σ n_i/W):
    k stochastic roundings of step 2r/Q each, and weights n_i/W rounded to 1/Q, divided by
    the weights' sum."""
    k, r, q = len(counts), cfg["secagg-clipping-range"], cfg["secagg-quantization-range"]
    weight = sum(counts) / cfg["secagg-max-weight"]
    return k * (2 * r + 2 * max_update) / (q * weight)


@pytest.mark.slow
def test_secagg_round_is_the_weighted_average_and_survives_a_dropout(tmp_path):
    recorder, history = _simulate(tmp_path, "secagg+")
    cfg = make_config(**SECURE)
    for server_round in (1, DROPOUT_ROUND):
        sent = recorder.sent[server_round]
        answered = [pid for pid in range(NUM_CLIENTS)
                    if not (pid == 0 and server_round == DROPOUT_ROUND)]
        updates = [_update(pid, server_round, [s.shape for s in sent]) for pid in answered]
        counts = [_examples(pid) for pid in answered]
        mean = [sum(n * u[i] for n, u in zip(counts, updates)) / sum(counts)
                for i in range(len(sent))]
        received = recorder.received[server_round]
        # the strategy never receives an individual update: every result is the aggregate,
        # and no client's example count (that is only inside the masked sum)
        assert [n for _, n in received] == [1] * len(counts)
        aggregate = received[0][0]
        for arrays, _ in received:
            for a, b in zip(arrays, aggregate):
                np.testing.assert_array_equal(a, b)
        error = max(float(np.max(np.abs((a - s) - m)))
                    for a, s, m in zip(aggregate, sent, mean))
        bound = quantization_bound(cfg, counts, max_update=0.5)
        print(f"round {server_round}: max |aggregate - weighted mean| = {error:.2e}, "
              f"bound {bound:.2e}")
        assert error <= bound + 1e-6, (error, bound)  # + float32 rounding of the weights
        # bytes on the wire: SecAgg+'s messages (keys, shares, masked vectors), counted at
        # the Grid, not the plaintext aggregate the strategy sees once per client
        model_bytes = sum(a.nbytes for a in sent)
        wire = history["rounds"][server_round]["bytes"]
        assert wire["up"] > 1.5 * len(answered) * model_bytes, (wire, model_bytes)
        assert wire["down"] > 1.2 * NUM_CLIENTS * model_bytes, (wire, model_bytes)
        for update in updates:  # and it is none of the clients' own
            assert max(float(np.max(np.abs((a - s) - u)))
                       for a, s, u in zip(aggregate, sent, update)) > 0.01
    fits = [r["fit"] for r in history["rounds"][1:]]
    assert [f["num_clients"] for f in fits] == [4, 3]
    assert [f["num_failures"] for f in fits] == [0, 1]
    error = fits[1]["failures"][0]["error"]  # named with its own error reply's reason
    assert "dropped out of the SecAgg+ round" in error and "client 0 drops out" in error
    assert history["stopped"] == "num-server-rounds"


@pytest.mark.slow
def test_plaintext_control_the_recorder_sees_each_update(tmp_path):
    recorder, _ = _simulate(tmp_path, "none")
    sent = recorder.sent[1]
    received = recorder.received[1]
    assert len(received) == NUM_CLIENTS
    by_count = {n: arrays for arrays, n in received}
    for pid in range(NUM_CLIENTS):
        update = _update(pid, 1, [s.shape for s in sent])
        for a, s, u in zip(by_count[_examples(pid)], sent, update):
            np.testing.assert_allclose(a - s, u, atol=1e-6)


@pytest.mark.slow
def test_the_app_trains_under_secagg_with_a_crashing_client(tmp_path):
    """The real app (digits, Keras clients): records, checkpoint and final model as in
    plaintext; the client that raises every round drops out and the rounds go on."""
    code = run_simulation.main([
        "--num-supernodes", "4", "--out", str(tmp_path), "--run-config",
        "num-server-rounds=2 local-epochs=1 min-fit-clients=3 min-available-clients=4 "
        "fraction-evaluate=0 secure-aggregation='secagg+' examples-cap-factor=0 "
        "fault-raise-fraction=0.25 secagg-min-clients=3 secagg-reconstruction-threshold=0.75"])
    assert code == 0
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2]
    for record in history["rounds"][1:]:
        assert record["fit"]["num_clients"] == 3 and record["fit"]["num_failures"] == 1
    accuracy = [r["centralized"]["accuracy"] for r in history["rounds"]]
    assert accuracy[-1] > accuracy[0] + 0.3, accuracy
    assert (tmp_path / "final_model.keras").is_file()
    assert (tmp_path / "checkpoint.npz").is_file()
