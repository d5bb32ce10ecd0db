"""Magnitude pruning (`prune-sparsity`): the schedule, the mask the server and the real
clients agree on, pruned weights kept at zero through local training, a client that breaks
the mask rejected, bytes that drop with sparsity, refusals, and a whole run's final model."""

from __future__ import annotations

import json
import logging

import keras
import numpy as np
import pytest
from flwr.common import (
    FitIns,
    RecordDict,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

import run_simulation
from fl_app.app.local_client import client_for
from fl_app.client.compression import CompressingClient
from fl_app.data.sources import data_source, load_partition
from fl_app.data.types import DataSettings
from fl_app.ml.models import build_model
from fl_app.ml.trainer import KerasTrainer
from fl_app.protocol.pruning_mask import apply_mask, magnitude_mask, scheduled_sparsity
from fl_app.schema import ConfigError
from fl_app.wire import (
    KEY_COMPRESS_TOP_K,
    KEY_COMPRESS_UP,
    KEY_PRUNE_SPARSITY,
    round_config,
)
from strategies.compose import compose
from strategies.compression import CompressedStrategy
from strategies.context import StrategyContext
from strategies.pruning import SPARSITY, PrunedStrategy
from strategies.validation import NUM_REJECTED
from tests.conftest import make_config
from tests.dp_rounds import client_manager
from tests.flower_objects import fit_res

CLIENTS = 3


def kernel_sparsity(weights: list[np.ndarray]) -> list[float]:
    """The share of exact zeros in each kernel (array of two or more axes)."""
    return [float(np.mean(w == 0)) for w in weights if np.ndim(w) >= 2]


def test_the_schedule_is_cubic_and_reaches_the_target_after_prune_rounds():
    schedule = [scheduled_sparsity(r, 0.8, 4) for r in range(7)]
    assert schedule[0] == 0.0 and schedule[4:] == [0.8, 0.8, 0.8]
    assert schedule[2] == pytest.approx(0.8 * (1 - 0.5 ** 3))
    steps = np.diff(schedule[:5])
    assert np.all(steps > 0) and np.all(np.diff(steps) < 0)  # fast first, then slower


def test_the_mask_derived_from_the_pruned_weights_is_the_servers():
    """A client derives its mask from the pruned weights it receives: the same mask the
    server computed from the unpruned aggregate, ties (exact zeros) included."""
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(30, 20)).astype(np.float32)
    kernel[0, :5] = 0.0  # zeros already there: ties at the smallest magnitude
    kernel[1, :3] = kernel[2, :3] = 0.25  # ties elsewhere
    weights = [kernel, rng.normal(size=20).astype(np.float32)]
    for sparsity in (0.004, 0.5, 0.8, 0.9):
        mask = magnitude_mask(weights, sparsity)
        assert int(mask[0].sum()) == int(sparsity * kernel.size) and not mask[1].any()
        pruned = apply_mask(weights, mask)
        assert np.abs(kernel[mask[0]]).max() <= np.abs(kernel[~mask[0]]).min()
        again = magnitude_mask(pruned, sparsity)
        assert all(np.array_equal(a, b) for a, b in zip(mask, again))


def real_clients(cfg) -> dict[str, CompressingClient]:
    """The app's own clients for partitions 0..CLIENTS-1, as the ClientApp wraps them."""
    return {f"c{pid}": CompressingClient(
        client_for(cfg, {"partition-id": pid, "num-partitions": CLIENTS}).to_client(),
        RecordDict()) for pid in range(CLIENTS)}


def play_round(strategy, server_round: int, weights, clients, config_extra=None):
    """configure_fit, each sampled real client fits, aggregate_fit: (new weights,
    metrics, the pruning layer's mask, each client's returned weights)."""
    instructions = strategy.configure_fit(server_round, ndarrays_to_parameters(weights),
                                          client_manager(CLIENTS))
    results = []
    for proxy, ins in instructions:
        ins = FitIns(ins.parameters, {**ins.config, **(config_extra or {})})
        results.append((proxy, clients[proxy.cid].fit(ins)))
    mask = strategy.inner.mask
    new, metrics = strategy.aggregate_fit(server_round, results, [])
    returned = {proxy.cid: parameters_to_ndarrays(res.parameters) for proxy, res in results}
    return None if new is None else parameters_to_ndarrays(new), metrics, mask, returned


@pytest.mark.parametrize("optimizer", ["", "adamw"])
def test_server_and_every_client_hold_the_same_mask_through_local_training(optimizer):
    """With an int8 broadcast (server and clients derive the mask from its decoded
    weights), every real client trains with exactly the server's mask: its trained kernels
    are zero there and nowhere else; the same fit without the round's sparsity moves those
    weights, and the server rejects every such update (the test fails when pruning is off).
    `adamw`: the user's compiled optimizer, weight decay and all, trains inside the masked loop."""
    run = dict(local_epochs=1, optimizer=optimizer, compress_down="int8",
               min_fit_clients=CLIENTS, min_available_clients=CLIENTS)
    cfg = make_config(prune_sparsity=0.8, prune_rounds=1, **run)
    settings = DataSettings.from_config(cfg)
    initial = build_model(str(cfg["model"]), data_source(settings).spec, 42).get_weights()
    strategy = compose(StrategyContext(cfg=cfg, initial_parameters=ndarrays_to_parameters(initial)),
                       meter=False)
    assert isinstance(strategy, CompressedStrategy) and isinstance(strategy.inner, PrunedStrategy)
    clients = real_clients(cfg)
    global_1, metrics, mask, _ = play_round(strategy, 1, initial, clients)
    assert mask is None and metrics[SPARSITY] == pytest.approx(0.8)
    assert all(s == pytest.approx(0.8, abs=1e-3) for s in kernel_sparsity(global_1))

    _, _, mask, returned = play_round(strategy, 2, global_1, clients)
    for weights in returned.values():
        for w, pruned in zip(weights, mask):
            if np.ndim(w) >= 2:
                assert np.array_equal(w == 0, pruned)  # the server's mask, exactly
    unpruned = real_clients(make_config(**run))  # clients of a run that prunes nothing
    new, metrics, _, unmasked = play_round(strategy, 2, global_1, unpruned,
                                           {KEY_PRUNE_SPARSITY: 0.0})
    assert new is None and metrics[NUM_REJECTED] == CLIENTS
    assert all(np.count_nonzero(w[pruned]) > 0.5 * pruned.sum()
               for weights in unmasked.values()
               for w, pruned in zip(weights, mask) if pruned.any())


@pytest.mark.parametrize("own, sent", [({"prune_sparsity": 0.5, "prune_rounds": 4}, 0.99),
                                       ({"prune_sparsity": 0.5, "prune_rounds": 2}, None),
                                       ({}, 0.5)])
def test_a_client_refuses_a_sparsity_its_own_run_config_does_not_schedule(own, sent):
    """A deviating server's sparsity (0.99: most of the model zeroed; the schedule of other
    prune-rounds; pruning a run that prunes nothing) is refused by the real client before
    it trains; the sparsity its own schedule gives for the round is accepted."""
    cfg = make_config(**own)
    client = client_for(cfg, {"partition-id": 0, "num-partitions": CLIENTS})
    settings = DataSettings.from_config(cfg)
    weights = build_model(str(cfg["model"]), data_source(settings).spec, 42).get_weights()
    schedule = scheduled_sparsity(2, 0.5, 4)  # round 3 of prune-sparsity=0.5, prune-rounds=4
    config = {**round_config(cfg, 3), KEY_PRUNE_SPARSITY: schedule if sent is None else sent}
    with pytest.raises(ValueError, match=f"{KEY_PRUNE_SPARSITY}=.*refused, nothing sent"):
        client.fit(weights, config)
    if own.get("prune_rounds") == 4:
        _, _, metrics = client.fit(weights, {**config, KEY_PRUNE_SPARSITY: schedule})
        assert metrics["local_steps"] > 0


@pytest.mark.parametrize("time_budget", [None, 0.5])
def test_an_ema_optimizer_and_a_time_budget_keep_the_pruned_weights_at_zero(time_budget):
    """An optimizer with an exponential moving average (whose final values overwrite the
    weights) and the time-budgeted loop: the pruned entries end at zero all the same."""
    cfg = make_config()
    spec = data_source(DataSettings.from_config(cfg)).spec
    model = build_model(str(cfg["model"]), spec, 42)
    trainer = KerasTrainer(model, spec, keras.optimizers.SGD(0.1, use_ema=True))
    mask = magnitude_mask(model.get_weights(), 0.8)
    trainer.set_weights(apply_mask(model.get_weights(), mask))
    settings = DataSettings.from_config(cfg)
    trainer.fit(load_partition(settings, 0, CLIENTS).train, epochs=2, batch_size=16,
                time_budget=time_budget, pruned=mask)
    trained = trainer.get_weights()
    assert all(np.array_equal(w == 0, p) for w, p in zip(trained, mask) if np.ndim(w) >= 2)


def test_a_client_that_breaks_the_mask_is_rejected_and_logged(caplog):
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=(8, 6)).astype(np.float32), np.zeros(6, np.float32)]
    cfg = make_config(prune_sparsity=0.5, prune_rounds=1, min_fit_clients=1,
                      min_available_clients=1)
    strategy = compose(StrategyContext(cfg=cfg, initial_parameters=ndarrays_to_parameters(weights)),
                       meter=False)
    sent = apply_mask(weights, magnitude_mask(weights, 0.5))
    instructions = strategy.configure_fit(2, ndarrays_to_parameters(sent), client_manager(2))
    assert all(ins.config[KEY_PRUNE_SPARSITY] == 0.5 for _, ins in instructions)
    mask = strategy.mask
    honest = [w + np.where(p, 0, 0.1).astype(np.float32) for w, p in zip(sent, mask)]
    liar = [w + 0.1 for w in sent]  # its pruned weights are 0.1
    (p0, _), (p1, _) = instructions
    with caplog.at_level(logging.WARNING, logger="flwr"):
        new, metrics = strategy.aggregate_fit(2, [(p0, fit_res(honest, 10)),
                                                  (p1, fit_res(liar, 1000))], [])
    assert metrics[NUM_REJECTED] == 1
    assert (f"rejected update from client {p1.cid}: 24 of its pruned weights are not zero"
            in caplog.text)
    new = parameters_to_ndarrays(new)
    np.testing.assert_allclose(new[0][~mask[0]], honest[0][~mask[0]], rtol=1e-6)  # honest
    assert np.all(new[0][mask[0]] == 0)


def test_pruned_updates_cost_fewer_bytes_under_top_k():
    """A client's update from a model pruned to s, sent by top-k at fraction 1 (every
    entry that is not exactly zero): the bytes fall with s; without pruning it sends all."""
    rng = np.random.default_rng(2)
    model = [rng.normal(size=(64, 32)).astype(np.float32), np.zeros(32, np.float32)]

    class Trains:  # moves every weight the mask leaves free, as KerasClient does
        def fit(self, ins):
            weights = parameters_to_ndarrays(ins.parameters)
            mask = magnitude_mask(weights, float(ins.config.get(KEY_PRUNE_SPARSITY, 0)))
            moved = [np.where(p, 0, w + 0.01).astype(np.float32) for w, p in zip(weights, mask)]
            return fit_res(moved, 10)

    sizes = []
    for sparsity in (0.0, 0.5, 0.8, 0.9):
        sent = apply_mask(model, magnitude_mask(model, sparsity))
        res = CompressingClient(Trains(), RecordDict()).fit(FitIns(
            ndarrays_to_parameters(sent), {KEY_COMPRESS_UP: "top-k", KEY_COMPRESS_TOP_K: 1.0,
                                           KEY_PRUNE_SPARSITY: sparsity}))
        sizes.append(sum(len(t) for t in res.parameters.tensors))
    entries = 64 * 32 + 32
    assert sizes[0] == 8 * entries
    assert sizes == [8 * (entries - int(s * 64 * 32)) for s in (0.0, 0.5, 0.8, 0.9)]


@pytest.mark.parametrize("conflict", [
    {"secure_aggregation": "secagg+", "examples_cap_factor": 0.0},
    {"homomorphic_encryption": "ckks"}, {"server_loop": "fedbuff"}])
def test_pruning_is_refused_where_the_mask_cannot_be_checked(conflict):
    key = next(iter(conflict)).replace("_", "-")
    with pytest.raises(ConfigError, match=f"prune-sparsity'?( > 0|=0.5).*{key}|{key}.*"
                                          "prune-sparsity'?( > 0|=0.5)"):
        make_config(prune_sparsity=0.5, **conflict)
    make_config(**conflict)  # without pruning it runs


@pytest.mark.slow
def test_a_pruned_run_saves_a_sparse_final_model_and_sends_fewer_bytes(tmp_path):
    out = tmp_path / "pruned"
    code = run_simulation.main(["--num-supernodes", "4", "--out", str(out), "--run-config",
                                ("num-server-rounds=3 prune-sparsity=0.8 prune-rounds=2 "
                                 "compress-up='top-k' compress-top-k=1.0 "
                                 "error-feedback=true")])
    assert code == 0
    rounds = json.loads((out / "history.json").read_text())["rounds"]
    assert [r["fit"][SPARSITY] for r in rounds[1:]] == pytest.approx([0.7, 0.8, 0.8])
    assert all(r["fit"].get(NUM_REJECTED, 0) == 0 for r in rounds[1:])
    assert rounds[3]["bytes"]["up"] < 0.35 * rounds[1]["bytes"]["up"]
    assert rounds[3]["centralized"]["accuracy"] > 0.8
    model = keras.models.load_model(out / "final_model.keras")
    assert all(s == pytest.approx(0.8, abs=1e-3) for s in kernel_sparsity(model.get_weights()))
