"""A fit round folded as its replies arrive (issue 20 item 3): `ValidatedStrategy`'s stream
gives the whole round's model bit for bit, a rejected reply never touches the sum, the
examples cap holds a bounded number of updates, strategies that need the whole round
decline to stream, and Flower's server loop (`FederatedServer`) feeds the stream."""

from __future__ import annotations

import logging
import random
import statistics

import numpy as np
import pytest
from flwr.common import (
    Code,
    FitRes,
    Parameters,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import Server
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy.aggregate import aggregate

from fl_app.server.runner import FederatedServer
from fl_app.server.stopping import StoppingRules
from strategies import ValidatedStrategy, WeightedFedAvg
from strategies.compose import compose
from strategies.context import StrategyContext
from strategies.running_sum import CappedWeightedSum, RunningWeightedSum
from strategies.validation import claim_cap
from strategies.wire_meter import parameters_bytes
from tests.conftest import make_config
from tests.flower_objects import FailingProxy, IdleProxy, fit_res, random_model, results


def _validated(global_model, **kwargs) -> ValidatedStrategy:
    inner = WeightedFedAvg(initial_parameters=ndarrays_to_parameters(global_model))
    strategy = ValidatedStrategy(inner, min_fit_clients=1, **kwargs)
    strategy.initialize_parameters(SimpleClientManager())
    return strategy


def _streamed(strategy: ValidatedStrategy, replies, failures=()):
    stream = strategy.open_fit_stream(1)
    assert stream is not None
    for proxy, res in replies:
        stream.add(proxy, res)
    return stream.finish(list(failures))


def _assert_same(a: Parameters, b: Parameters) -> None:
    for x, y in zip(parameters_to_ndarrays(a), parameters_to_ndarrays(b), strict=True):
        assert x.dtype == y.dtype and np.array_equal(x, y)  # bit for bit


def _updates(seed: int, claims) -> tuple[list[np.ndarray], list]:
    rng = np.random.default_rng(seed)
    global_model = random_model(rng)
    return global_model, [([g + rng.normal(size=g.shape).astype(np.float32) * np.float32(0.1)
                            for g in global_model], n) for n in claims]


CLAIMS = {
    "equal": [60] * 8,
    "spread": [30, 90, 45, 120, 60, 75, 50, 100],
    "liars within the hold": [60, 10**9, 70, 80, 10**12, 65, 10**6, 55],
}


@pytest.mark.parametrize("factor", [0.0, 3.0])
@pytest.mark.parametrize("claims", list(CLAIMS.values()), ids=list(CLAIMS))
def test_streamed_round_equals_the_whole_round_bit_for_bit(factor, claims):
    global_model, updates = _updates(1, claims)
    whole, whole_metrics = _validated(global_model, examples_cap_factor=factor).aggregate_fit(
        1, results(updates), [])
    streamed, metrics = _streamed(_validated(global_model, examples_cap_factor=factor),
                                  results(updates))
    _assert_same(streamed, whole)
    assert metrics == whole_metrics
    stream = _validated(global_model, examples_cap_factor=factor).open_fit_stream(1)
    for proxy, res in results(updates):
        stream.add(proxy, res)
    assert all(res.parameters.tensors == [] for _, res in stream.accepted)  # keeps no reply
    assert len(stream.sum._held) == (min(3, len(claims)) if factor else 0)
    cap = int(factor * statistics.median_low(claims))
    capped = [min(n, cap) if factor else n for n in claims]
    assert metrics["num_capped"] == sum(c != n for c, (_, n) in zip(capped, updates))
    for ours, flowers in zip(parameters_to_ndarrays(streamed),
                             aggregate([(u, c) for (u, _), c in zip(updates, capped)])):
        np.testing.assert_allclose(ours, flowers, atol=1e-6, rtol=0)


def _bad_replies(global_model) -> dict[str, FitRes]:
    nan = [a.copy() for a in global_model]
    nan[1][0] = np.nan
    undecodable = fit_res(global_model, 10)
    undecodable.parameters.tensors[0] = b"not an npy array"
    return {"nan": fit_res(nan, 10), "shape": fit_res([a.T for a in global_model], 10),
            "dtype": fit_res([a.astype(np.float64) for a in global_model], 10),
            "claim": fit_res(global_model, 0), "undecodable": undecodable}


@pytest.mark.parametrize("factor", [0.0, 3.0])
@pytest.mark.parametrize("kind", list(_bad_replies(random_model(np.random.default_rng(0)))))
def test_a_rejected_reply_leaves_the_sum_exactly_as_it_was(factor, kind):
    global_model, updates = _updates(2, [40, 50, 60, 70, 80])
    stream = _validated(global_model, examples_cap_factor=factor).open_fit_stream(1)
    good = results(updates)
    for proxy, res in good[:4]:
        stream.add(proxy, res)
    total = stream.sum.total
    before = ([s.copy() for s in total._sums], total.total_weight, total.count,
              list(stream.sum.claims), list(stream.sum._held))
    stream.add(IdleProxy("bad"), _bad_replies(global_model)[kind])
    after = ([s.copy() for s in total._sums], total.total_weight, total.count,
             list(stream.sum.claims), list(stream.sum._held))
    assert all(np.array_equal(a, b) for a, b in zip(before[0], after[0]))
    assert before[1:] == after[1:]
    assert stream.rejected[0][0] == "bad"
    stream.add(*good[4])
    with_bad, metrics = stream.finish([])
    without, _ = _streamed(_validated(global_model, examples_cap_factor=factor), good)
    _assert_same(with_bad, without)
    assert metrics["num_rejected"] == 1


def test_the_stream_holds_at_most_stream_hold_updates():
    global_model, updates = _updates(3, [50 + 7 * i for i in range(20)])
    total = CappedWeightedSum(global_model, factor=3.0, hold=2)
    for arrays, n in updates:
        assert total.add(arrays, n) is None
        assert len(total._held) <= 2
    assert total.total.count == len(updates) - 2 and total.exact
    reference = RunningWeightedSum(global_model)
    for arrays, n in updates:
        reference.add(arrays, n)
    for ours, want in zip(total.finish().result(), reference.result()):
        np.testing.assert_allclose(ours, want, atol=1e-6, rtol=0)


def test_the_running_cap_is_the_rule_on_every_claim_so_far():
    """The running sum keeps its claims sorted and reads their median: at every step its
    cap is `claim_cap` of the claims in the order they arrived."""
    claims = [int(n) for n in np.random.default_rng(7).integers(1, 500, 41)]
    global_model, updates = _updates(5, claims)
    total = CappedWeightedSum(global_model, factor=2.5, hold=3)
    for i, (arrays, n) in enumerate(updates):
        total.add(arrays, n)
        assert total.cap() == claim_cap(claims[:i + 1], 2.5)


def test_more_liars_than_the_hold_the_whole_round_still_caps_every_claim(caplog):
    """Beyond `stream_hold` inflated claims a streamed round cannot know the final cap when
    it folds: it keeps the previous model (logged) rather than average in weights the rule
    would not give; the whole-round path, which has every update, caps each claim exactly
    as the rule says."""
    claims = [10**9, 10**9, 10**9, 10**9, 60, 60, 60, 60, 60, 60]  # liars first
    global_model, updates = _updates(4, claims)
    capped = [min(n, 3 * 60) for n in claims]
    whole, metrics = _validated(global_model, examples_cap_factor=3.0).aggregate_fit(
        1, results(updates), [])
    for ours, flowers in zip(parameters_to_ndarrays(whole),
                             aggregate([(u, c) for (u, _), c in zip(updates, capped)])):
        np.testing.assert_allclose(ours, flowers, atol=1e-6, rtol=0)
    assert metrics["num_capped"] == 4
    with caplog.at_level(logging.WARNING, logger="flwr"):
        streamed, streamed_metrics = _streamed(
            _validated(global_model, examples_cap_factor=3.0), results(updates))
    assert "more than 3 claims exceeded the examples cap" in caplog.text
    assert "keeping the previous global model" in caplog.text
    assert streamed is None and streamed_metrics["num_capped"] == 4


def test_too_few_valid_replies_keep_the_previous_model():
    global_model, updates = _updates(5, [10, 20])
    strategy = _validated(global_model)
    strategy.min_fit_clients = 3
    assert _streamed(strategy, results(updates)) == (None, {"num_rejected": 0})
    assert strategy.aggregate_fit(1, results(updates), []) == (None, {"num_rejected": 0})


def test_failures_reach_the_inner_strategy():
    global_model, updates = _updates(6, [10, 20])
    strategy = _validated(global_model)
    strategy.inner.accept_failures = False
    assert _streamed(strategy, results(updates), [RuntimeError("down")]) == (
        None, {"num_rejected": 0, "num_capped": 0})


def _chain(clients: int = 2, **config):
    cfg = make_config(min_fit_clients=2, min_available_clients=clients, **config)
    model = ndarrays_to_parameters(random_model(np.random.default_rng(0)))
    strategy = compose(StrategyContext(cfg, model))
    manager = SimpleClientManager()
    for i in range(clients):
        manager.register(IdleProxy(f"c{i}"))
    strategy.initialize_parameters(manager)
    random.seed(0)  # Flower's SimpleClientManager samples with `random`: the same sample
    strategy.configure_fit(1, model, manager)
    return strategy


AVERAGING = ["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm"]
STREAMING = [{}, *({"strategy": name} for name in AVERAGING), {"strategy": "dp-fixed"},
             {"strategy": "dp-adaptive"}, {"strategy": "dp-client-fixed"},
             {"strategy": "dp-client-adaptive"},
             {"strategy": "dp-fixed", "dp_inner": "fedmedian"}]  # DP averages, then the inner


@pytest.mark.parametrize("config", [
    *STREAMING, {"strategy": "fedmedian"}, {"strategy": "fedtrimmedavg"}, {"strategy": "krum"},
    {"strategy": "bulyan"}, {"strategy": "qfedavg"}, {"strategy": "fednova"},
    {"outlier_norm_factor": 3.0}, {"compress_up": "fp16"}, {"straggler_fraction": 0.5},
    {"strategy": "dp-client-fixed", "secure_aggregation": "secagg+", "examples_cap_factor": 0.0}])
def test_averaging_and_central_dp_stream_the_rest_aggregate_whole(config):
    stream = _chain(**config).open_fit_stream(1)
    assert (stream is not None) == (config in STREAMING)


@pytest.mark.parametrize("name", AVERAGING)
def test_flowers_averaging_strategies_stream_and_equal_their_own_aggregate_fit(name):
    """Streamed == whole round bit for bit; both equal what the Flower strategy makes of
    the updates themselves (its `aggregate_fit`) within 1e-6, metrics included."""
    chains = _chain(strategy=name), _chain(strategy=name), _chain(strategy=name)
    sent = parameters_to_ndarrays(chains[0].inner._sent)
    rng = np.random.default_rng(9)
    replies = [(IdleProxy(f"c{i}"), fit_res([a + rng.normal(size=a.shape).astype(np.float32)
                                             for a in sent], 10 * (i + 1),
                                            {"loss": float(i)})) for i in range(2)]
    whole, whole_metrics = chains[0].aggregate_fit(1, replies, [])
    streamed, metrics = _streamed(chains[1].inner, replies)
    _assert_same(streamed, whole)
    assert metrics == whole_metrics
    flowers, flowers_metrics = chains[2].inner.inner.aggregate_fit(1, replies, [])
    for ours, theirs in zip(parameters_to_ndarrays(streamed), parameters_to_ndarrays(flowers)):
        assert ours.dtype == np.float32
        np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
    assert metrics["loss"] == pytest.approx(flowers_metrics["loss"])


@pytest.mark.parametrize("strategy", ["dp-fixed", "dp-adaptive"])
def test_a_streamed_dp_round_releases_the_whole_rounds_model_bit_for_bit(strategy):
    config = dict(strategy=strategy, dp_noise_seed=7, clipping_norm=0.5)
    chains = _chain(**config), _chain(**config)
    sent = parameters_to_ndarrays(chains[0].inner._sent)
    rng = np.random.default_rng(8)
    replies = [(IdleProxy(f"c{i}"), fit_res([a + rng.normal(size=a.shape).astype(np.float32)
                                             for a in sent], 10 * (i + 1))) for i in range(2)]
    nan = fit_res([np.full_like(a, np.nan) for a in sent], 5)
    whole, whole_metrics = chains[0].aggregate_fit(1, [*replies, (IdleProxy("c9"), nan)], [])
    stream = chains[1].open_fit_stream(1)
    for proxy, res in [*replies, (IdleProxy("c9"), nan)]:
        stream.add(proxy, res)
    streamed, metrics = stream.finish([])
    _assert_same(streamed, whole)
    assert metrics == whole_metrics and metrics["num_rejected"] == 1
    assert chains[0].inner.inner.accountant.get_state() == \
        chains[1].inner.inner.accountant.get_state()


def _round(chain, seed: int, claims) -> list:
    """Replies of the clients c0, c1, ... to the model `chain` sent."""
    sent = parameters_to_ndarrays(chain.inner._sent)
    rng = np.random.default_rng(seed)
    return [(IdleProxy(f"c{i}"), fit_res([a + rng.normal(size=a.shape).astype(np.float32)
                                          for a in sent], n)) for i, n in enumerate(claims)]


@pytest.mark.parametrize("factor", [0.0, 3.0])
def test_replies_are_folded_in_the_samples_order_whichever_arrives_first(factor):
    """Two runs whose replies arrive in different orders fold the same sums: streamed in
    one order (a client failing) == the whole round in another, bit for bit."""
    claims = [40, 90, 60, 10**9, 75, 50, 65, 80]
    whole_chain, chain = _chain(8, examples_cap_factor=factor), \
        _chain(8, examples_cap_factor=factor)
    replies = _round(whole_chain, 10, claims)
    failed = replies.pop(2)[0]
    shuffled = [replies[i] for i in np.random.default_rng(11).permutation(len(replies))]
    whole, whole_metrics = whole_chain.aggregate_fit(1, shuffled, [RuntimeError("down")])
    stream = chain.open_fit_stream(1)
    for proxy, res in [*replies[3:], replies[0], replies[2]]:
        stream.add(proxy, res)
    assert stream.stream._waiting  # the first client of the sample has not answered
    stream.skip(failed)
    stream.add(*replies[1])
    assert not stream.stream._waiting
    streamed, metrics = stream.finish([RuntimeError("down")])
    _assert_same(streamed, whole)
    assert metrics == whole_metrics


def test_past_stream_reorder_bytes_waiting_the_stream_stops_waiting():
    claims = [50 + i for i in range(12)]
    chain = _chain(12)
    replies = _round(chain, 12, claims)
    model_bytes = sum(a.nbytes for a in parameters_to_ndarrays(chain.inner._sent))
    chain.inner.stream_reorder_bytes = 3 * model_bytes
    stream = chain.open_fit_stream(1)
    for proxy, res in reversed(replies):  # the first client of the sample answers last
        stream.add(proxy, res)
        assert len(stream.stream._waiting) <= 3
    streamed, _ = stream.finish([])
    updates = [(parameters_to_ndarrays(res.parameters), n)
               for (_, res), n in zip(replies, claims)]
    for ours, flowers in zip(parameters_to_ndarrays(streamed), aggregate(updates)):
        np.testing.assert_allclose(ours, flowers, atol=1e-6, rtol=0)


class UpdatingProxy(IdleProxy):
    """A client whose fit returns the model it was sent plus its own fixed update."""

    def __init__(self, cid: str, num_examples: int, metrics: dict | None = None) -> None:
        super().__init__(cid)
        self.num_examples, self.metrics = num_examples, metrics or {}

    def fit(self, ins, timeout, group_id):
        rng = np.random.default_rng(int(self.cid[1:]))
        arrays = [a + rng.normal(size=a.shape).astype(a.dtype)
                  for a in parameters_to_ndarrays(ins.parameters)]
        return fit_res(arrays, self.num_examples, dict(self.metrics))


class NotOkProxy(IdleProxy):
    """A client whose fit answers with a status that is not OK."""

    def fit(self, ins, timeout, group_id):
        return FitRes(Status(Code.FIT_NOT_IMPLEMENTED, "no"), Parameters([], ""), 0, {})


def _server(clients) -> tuple[FederatedServer, list[dict]]:
    cfg = make_config(min_fit_clients=2, min_available_clients=len(clients),
                      fraction_evaluate=0.0)
    model = ndarrays_to_parameters(random_model(np.random.default_rng(0)))
    rounds: list[dict] = []
    server = FederatedServer(strategy=compose(StrategyContext(cfg, model)), seed=0,
                             stopping=StoppingRules(),
                             on_round=lambda record, p: rounds.append(record),
                             on_finish=lambda reason, p: None)
    for client in clients:
        server.client_manager().register(client)
    server.parameters = model
    return server, rounds


def _clients():
    return [UpdatingProxy(f"c{i}", 10 * (i + 1), {"data_rows": 10 * (i + 1),
                                                  "time_training": 0.5})
            for i in range(5)] + [FailingProxy("c8"), NotOkProxy("c9")]


def test_the_server_streams_a_round_as_flowers_round_would_aggregate_it():
    streamed_server, _ = _server(_clients())
    params, metrics, (replies, failures) = streamed_server.fit_round(1, None)
    up = streamed_server.wire.take()["up"]
    whole_server, _ = _server(_clients())
    whole, whole_metrics, (whole_replies, whole_failures) = Server.fit_round(
        whole_server, 1, None)
    assert up == whole_server.wire.take()["up"] == sum(
        parameters_bytes(res.parameters) for _, res in whole_replies) > 0
    for a, b in zip(parameters_to_ndarrays(params), parameters_to_ndarrays(whole), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)  # replies may arrive in any order
    assert metrics == whole_metrics
    assert sorted(p.cid for p, _ in replies) == sorted(p.cid for p, _ in whole_replies)
    assert all(res.parameters.tensors == [] for _, res in replies)  # dropped once folded
    assert len(failures) == len(whole_failures) == 2


def test_the_round_record_is_the_same_when_streamed():
    server, rounds = _server(_clients())
    server.fit(num_rounds=1, timeout=None)
    fit = rounds[1]["fit"]
    assert (fit["num_sampled"], fit["num_clients"], fit["num_failures"]) == (7, 5, 2)
    assert fit["data_quality"]["c0"] == {"rows": 10}
    assert fit["timing"] == {"training": 0.5}
    assert {f["client"] for f in fit["failures"]} >= {"c9"}
    assert rounds[1]["bytes"]["up"] > 0


@pytest.mark.slow
def test_a_flower_simulation_gives_the_same_run_streamed_or_whole(tmp_path, monkeypatch):
    """run_simulation.py on Flower's simulation engine: the streamed rounds (the default)
    record the run the whole-round path records (replies arrive in any order, so the
    losses agree to float rounding), and every round was streamed."""
    import json

    import run_simulation

    config = "num-server-rounds=2 local-epochs=1 min-fit-clients=3 min-available-clients=3"

    def history(out) -> dict:
        assert run_simulation.main(["--num-supernodes", "3", "--run-config", config,
                                    "--out", str(out)]) == 0
        return json.loads((out / "history.json").read_text())

    opened = []
    open_fit_stream = ValidatedStrategy.open_fit_stream
    monkeypatch.setattr(ValidatedStrategy, "open_fit_stream",
                        lambda self, r: opened.append(r) or open_fit_stream(self, r))
    streamed = history(tmp_path / "streamed")
    assert opened == [1, 2]
    monkeypatch.setattr(ValidatedStrategy, "open_fit_stream", lambda self, r: None)
    whole = history(tmp_path / "whole")
    for ours, theirs in zip(streamed["rounds"], whole["rounds"], strict=True):
        assert ours.get("bytes") == theirs.get("bytes")
        assert ours["centralized"]["loss"] == pytest.approx(theirs["centralized"]["loss"],
                                                            abs=1e-5)
        assert ours["centralized"]["accuracy"] == pytest.approx(
            theirs["centralized"]["accuracy"], abs=1e-3)
        keys = ("num_sampled", "num_clients", "num_failures", "num_rejected", "num_capped")
        assert {k: ours.get("fit", {}).get(k) for k in keys} == \
            {k: theirs.get("fit", {}).get(k) for k in keys}


class BrokenStream:
    """A `FitStream` whose `add` fails: a bug on the server's side."""

    def add(self, proxy, res):
        raise ZeroDivisionError("server bug")

    def finish(self, failures):
        raise AssertionError("never reached")


def test_a_stream_that_fails_fails_the_round_not_the_client():
    from flwr.common import FitIns

    from fl_app.server.runner import StreamFailed, fit_clients_streamed

    model = ndarrays_to_parameters(random_model(np.random.default_rng(0)))
    instructions = [(UpdatingProxy(f"c{i}", 10), FitIns(model, {})) for i in range(3)]
    with pytest.raises(StreamFailed, match="server bug"):
        fit_clients_streamed(instructions, None, None, 1, BrokenStream())


def test_a_bad_claim_leaves_the_capped_sum_and_its_claims_untouched():
    global_model, updates = _updates(6, [50, 60])
    total = CappedWeightedSum(global_model, factor=3.0, hold=1)
    total.add(*updates[0])
    for claim in (0, -5, float("nan")):
        with pytest.raises(ValueError, match="positive and finite"):
            total.add(updates[1][0], claim)
    assert total.claims == [50] and total.total.count == 0 and len(total._held) == 1
