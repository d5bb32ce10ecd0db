"""The central-DP wrappers: clipping, equal-weight averaging, noise, client-side mode, state."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from scipy import stats

from fl_app.schema import ConfigError
from fl_app.wire import KEY_CLIPPING_NORM, KEY_NORM_BIT
from strategies.dp import centred_unclipped_count, check_config, split_noise_multiplier
from strategies.validated import ValidatedStrategy
from tests.conftest import make_config
from tests.dp_rounds import client_manager, dp_strategy, play_round, sends, zeros
from tests.flower_objects import IdleProxy, fit_res

FALSE_FAILURE_RATE = 1e-6  # two-sided, per statistical assertion


def _updates(rng, cids, norms):
    """Random-direction updates with the given L2 norms (over all layers together)."""
    out = {}
    for cid, norm in zip(cids, norms):
        raw = [rng.normal(size=a.shape) for a in zeros()]
        scale = norm / np.sqrt(sum(np.sum(r ** 2) for r in raw))
        out[cid] = [(r * scale).astype(np.float32) for r in raw]
    return out


def _clip_by_hand(update, clip_norm):
    flat = np.concatenate([u.astype(np.float64).ravel() for u in update])
    factor = min(1.0, clip_norm / np.linalg.norm(flat))
    return [u.astype(np.float64) * factor for u in update]


def _round(strategy, manager, updates, base=None, num_examples=10):
    base = base if base is not None else zeros()
    return play_round(strategy, manager, 1, base, sends(updates, base, num_examples))


def test_noise_zero_aggregate_is_the_mean_of_the_clipped_updates():
    rng = np.random.default_rng(0)
    manager = client_manager(6)
    cids = [f"c{i}" for i in range(6)]
    updates = _updates(rng, cids, [0.2, 0.7, 1.0, 1.5, 4.0, 30.0])  # mixed: under and over C
    base = [rng.normal(size=a.shape).astype(np.float32) for a in zeros()]
    new, metrics, _ = _round(dp_strategy(clipping_norm=1.0), manager, updates, base)
    clipped = [_clip_by_hand(updates[c], 1.0) for c in cids]
    for c in clipped:
        assert np.sqrt(sum(np.sum(a ** 2) for a in c)) <= 1.0 + 1e-6
    expected = [b + np.mean(layer, axis=0) for b, layer in zip(base, zip(*clipped))]
    for got, want in zip(new, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert metrics["dp_clip_norm"] == 1.0 and metrics["dp_noise_std"] == 0.0


def test_updates_under_the_clip_norm_pass_unchanged():
    rng = np.random.default_rng(1)
    manager = client_manager(4)
    updates = _updates(rng, [f"c{i}" for i in range(4)], [0.1, 0.3, 0.5, 0.9])
    new, _, _ = _round(dp_strategy(clipping_norm=1.0), manager, updates)
    plain_mean = [np.mean(layer, axis=0) for layer in zip(*updates.values())]
    for got, want in zip(new, plain_mean):
        np.testing.assert_allclose(got, want, atol=1e-7)


def test_every_client_weighs_the_same_whatever_num_examples_it_claims():
    rng = np.random.default_rng(2)
    manager = client_manager(3)
    updates = _updates(rng, ["c0", "c1", "c2"], [0.5, 0.5, 0.5])
    claims = {"c0": 1, "c1": 10, "c2": 10_000}
    base = zeros()

    def client(proxy, ins):
        return [b + u for b, u in zip(base, updates[proxy.cid])], claims[proxy.cid], {}

    new, _, _ = play_round(dp_strategy(), manager, 1, base, client)
    for got, layer in zip(new, zip(*updates.values())):
        np.testing.assert_allclose(got, np.mean(layer, axis=0), atol=1e-7)


def test_invalid_updates_are_rejected_and_count_as_zero_over_the_sampled_m():
    rng = np.random.default_rng(3)
    manager = client_manager(4)
    updates = _updates(rng, ["c0", "c1", "c2", "c3"], [0.5] * 4)
    updates["c3"] = [np.full_like(u, np.nan) for u in updates["c3"]]
    new, metrics, _ = _round(dp_strategy(), manager, updates)
    assert metrics["num_rejected"] == 1
    valid_sum = [np.sum(layer, axis=0) for layer in zip(*(updates[c] for c in ("c0", "c1", "c2")))]
    for got, want in zip(new, valid_sum):
        np.testing.assert_allclose(got, want / 4, atol=1e-7)  # fixed denominator m = 4


def test_per_client_fit_metrics_are_not_released():
    manager = client_manager(2)
    base = zeros()

    def client(proxy, ins):
        return base, 5, {"train_loss": 0.3}

    _, metrics, _ = play_round(dp_strategy(), manager, 1, base, client)
    assert "train_loss" not in metrics


@pytest.mark.parametrize("num_clients, clip_norm, noise, adaptive",
                         [(4, 1.0, 1.0, False), (16, 0.5, 2.0, False), (10, 1.0, 1.0, True)])
def test_added_noise_has_std_noise_multiplier_times_c_over_m(num_clients, clip_norm, noise,
                                                             adaptive):
    """Chi-square test of the noise variance (known mean 0) over ~40k coordinates, and a
    z-test of its mean; each fails by chance with probability FALSE_FAILURE_RATE."""
    shapes = ((200, 100), (100,), (100, 200))
    base = zeros(shapes)
    manager = client_manager(num_clients)
    strategy = dp_strategy(initial=base, noise_multiplier=noise, clipping_norm=clip_norm,
                           adaptive=adaptive, noise_seed=7)
    new, metrics, _ = play_round(strategy, manager, 1, base, lambda p, i: (base, 1, {}))
    noise_values = np.concatenate([a.astype(np.float64).ravel() for a in new])
    z = split_noise_multiplier(noise, max(num_clients / 20, noise)) if adaptive else noise
    sigma = z * clip_norm / num_clients
    assert metrics["dp_noise_std"] == pytest.approx(sigma)
    n = noise_values.size
    statistic = np.sum(noise_values ** 2) / sigma ** 2
    low, high = stats.chi2.ppf([FALSE_FAILURE_RATE / 2, 1 - FALSE_FAILURE_RATE / 2], n)
    assert low < statistic < high
    z_limit = stats.norm.ppf(1 - FALSE_FAILURE_RATE / 2)
    assert abs(noise_values.mean()) < z_limit * sigma / np.sqrt(n)


def test_noise_is_secret_by_default_and_reproducible_only_with_a_noise_seed():
    manager = client_manager(3)
    base = zeros()

    def run(noise_seed):
        strategy = dp_strategy(noise_multiplier=1.0, noise_seed=noise_seed)
        return play_round(strategy, manager, 1, base, lambda p, i: (base, 1, {}))[0]

    for a, b in zip(run(3), run(3)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(run(3)[0], run(4)[0])
    assert not np.array_equal(run(0)[0], run(0)[0])  # OS entropy: nobody can recompute it


def test_client_sample_follows_the_dp_generator_not_the_run_seed():
    """Amplification by sampling needs a sample nobody can predict from the run config."""
    def samples(noise_seed):
        manager, strategy = client_manager(20), dp_strategy(fraction_fit=0.25,
                                                            noise_seed=noise_seed)
        return [sorted(p.cid for p, _ in strategy.configure_fit(
            r, ndarrays_to_parameters(zeros()), manager)) for r in range(1, 6)]

    assert all(len(sample) == 5 for sample in samples(1))
    assert samples(1) == samples(1) and samples(1) != samples(2)
    assert samples(0) != samples(0)


def test_a_round_whose_clients_all_failed_still_releases_noise_and_is_accounted():
    manager, base = client_manager(4), zeros()
    strategy = dp_strategy(noise_multiplier=1.0, initial=base)
    strategy.configure_fit(1, ndarrays_to_parameters(base), manager)
    new, metrics = strategy.aggregate_fit(1, [], [RuntimeError("client crashed")] * 4)
    noise = np.concatenate([a.ravel() for a in parameters_to_ndarrays(new)])
    assert metrics["dp_noise_std"] == pytest.approx(1.0 / 4) and np.std(noise) > 0.1
    assert strategy.privacy_report(1)["epsilon"] > 0


def test_centred_count_moves_by_one_half_per_client():
    """The noise split assumes the clipped-count query has sensitivity 1/2."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        bits = list(rng.random(int(rng.integers(0, 10))) < 0.5)
        for extra in (True, False):
            change = centred_unclipped_count(bits + [extra]) - centred_unclipped_count(bits)
            assert abs(change) == 0.5


@pytest.mark.parametrize("overrides, key", [({"accept_failures": False}, "accept-failures"),
                                            ({"outlier_norm_factor": 3.0},
                                             "outlier-norm-factor")])
def test_settings_dp_cannot_honour_are_refused(overrides, key):
    check_config(make_config(strategy="weighted-fedavg", **overrides))  # fine without DP
    with pytest.raises(ConfigError, match=f"'{key}'.*strategy='dp-fixed'"):
        check_config(make_config(strategy="dp-fixed", **overrides))


def test_same_aggregate_as_flowers_server_side_fixed_clipping_without_noise():
    rng = np.random.default_rng(5)
    num_clients, clip_norm = 5, 0.8
    updates = _updates(rng, [f"c{i}" for i in range(num_clients)], [0.1, 0.5, 0.9, 2.0, 7.0])
    base = [rng.normal(size=a.shape).astype(np.float32) for a in zeros()]
    ours, _, _ = _round(dp_strategy(clipping_norm=clip_norm, initial=base),
                        client_manager(num_clients), updates, base)

    flower = DifferentialPrivacyServerSideFixedClipping(
        FedAvg(min_fit_clients=1, min_available_clients=1), noise_multiplier=0.0,
        clipping_norm=clip_norm, num_sampled_clients=num_clients)
    manager = client_manager(num_clients)
    instructions = flower.configure_fit(1, ndarrays_to_parameters(base), manager)
    results = [(proxy, fit_res([b + u for b, u in zip(base, updates[proxy.cid])], 10))
               for proxy, _ in instructions]
    theirs, _ = flower.aggregate_fit(1, results, [])
    for a, b in zip(ours, parameters_to_ndarrays(theirs)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_client_side_clipping_sends_c_in_every_fit_config():
    manager = client_manager(4)
    strategy = dp_strategy(client_side=True, clipping_norm=0.7)
    seen = []

    def client(proxy, ins):
        seen.append(ins.config)
        return zeros(), 1, {}

    play_round(strategy, manager, 1, zeros(), client)
    assert len(seen) == 4
    assert all(config[KEY_CLIPPING_NORM] == 0.7 for config in seen)


def test_client_side_server_reclips_an_update_a_client_did_not_clip():
    rng = np.random.default_rng(6)
    manager = client_manager(2)
    updates = _updates(rng, ["c0", "c1"], [5.0, 0.2])
    strategy = dp_strategy(client_side=True, clipping_norm=1.0)
    new, _, _ = _round(strategy, manager, updates)
    expected = [(_clip_by_hand(updates["c0"], 1.0)[i] + updates["c1"][i]) / 2 for i in range(2)]
    for got, want in zip(new, expected):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_client_side_adaptive_rejects_an_update_without_the_norm_bit():
    manager = client_manager(3)
    base = zeros()
    updates = _updates(np.random.default_rng(9), ["c0", "c1", "c2"], [0.3, 0.6, 0.2])
    honest = sends(updates, base)

    def client(proxy, ins):
        arrays, num_examples, _ = honest(proxy, ins)
        return arrays, num_examples, {} if proxy.cid == "c2" else {KEY_NORM_BIT: False}

    strategy = dp_strategy(adaptive=True, client_side=True)
    new, metrics, _ = play_round(strategy, manager, 1, base, client)
    assert metrics["num_rejected"] == 1
    for got, want in zip(new, [base[i] + (updates["c0"][i] + updates["c1"][i]) / 3
                               for i in range(len(base))]):  # c2 counts as a zero update
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_state_round_trip_continues_identically():
    rng = np.random.default_rng(8)
    manager = client_manager(5)
    updates = _updates(rng, [f"c{i}" for i in range(5)], [0.5, 1.0, 2.0, 3.0, 4.0])

    def fresh():
        return dp_strategy(adaptive=True, noise_multiplier=1.0, clipping_norm=0.3, noise_seed=1)

    first = fresh()
    after_one, _, _ = _round(first, manager, updates)
    saved = json.loads(json.dumps(first.get_state()))  # JSON-serialisable
    two_a, metrics_a, _ = play_round(first, manager, 2, after_one, sends(updates, after_one))

    second = fresh()
    second.set_state(saved)
    assert second.clip_norm == saved["dp"]["clip_norm"] != 0.3  # adapted after round 1
    two_b, metrics_b, _ = play_round(second, manager, 2, after_one, sends(updates, after_one))
    for a, b in zip(two_a, two_b):
        np.testing.assert_array_equal(a, b)
    assert metrics_a == metrics_b
    assert first.privacy_report(2) == second.privacy_report(2)


def test_a_round_with_fewer_valid_updates_than_min_fit_clients_is_still_released():
    """The inner strategy's own minimum-client rule must not veto the DP release."""
    manager, base = client_manager(3), zeros()
    updates = _updates(np.random.default_rng(4), ["c0", "c1", "c2"], [0.5, 0.5, 0.5])
    honest = sends(updates, base)

    def client(proxy, ins):
        arrays, n, metrics = honest(proxy, ins)
        return ([np.full_like(a, np.nan) for a in arrays] if proxy.cid != "c0" else arrays,
                n, metrics)

    strategy = dp_strategy(min_fit_clients=2, initial=base)
    new, metrics, _ = play_round(strategy, manager, 1, base, client)
    assert metrics["num_rejected"] == 2
    for got, update in zip(new, updates["c0"]):  # c1 and c2 count as zero updates
        np.testing.assert_allclose(got, update / 3, atol=1e-6)


def test_unseeded_state_holds_no_generator_and_a_restore_draws_fresh_noise():
    """A checkpoint with the noise generator's state would let its reader replay and
    subtract a round's noise; an unseeded strategy persists none, and a restored copy
    draws noise that differs from the original's."""
    rng = np.random.default_rng(12)
    manager = client_manager(4)
    updates = _updates(rng, [f"c{i}" for i in range(4)], [0.5] * 4)
    original = dp_strategy(noise_multiplier=1.0)
    after_one, _, _ = _round(original, manager, updates)
    saved = json.loads(json.dumps(original.get_state()))
    assert "rng" not in saved["dp"] and "sampling_rng" not in saved["dp"]
    assert "PCG64" not in json.dumps(saved)
    restored = dp_strategy(noise_multiplier=1.0)
    restored.set_state(saved)
    a, _, _ = play_round(original, manager, 2, after_one, sends(updates, after_one))
    b, _, _ = play_round(restored, manager, 2, after_one, sends(updates, after_one))
    assert any(not np.allclose(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("adaptive", [False, True])
def test_updates_from_outside_the_sample_or_repeated_are_dropped(caplog, adaptive):
    manager, base = client_manager(4), zeros()
    updates = _updates(np.random.default_rng(13), ["c0", "c1", "c2", "c3"], [0.5] * 4)
    strategy = ValidatedStrategy(dp_strategy(fraction_fit=0.5, adaptive=adaptive,
                                             clipping_norm=10.0), min_fit_clients=0)
    instructions = strategy.configure_fit(1, ndarrays_to_parameters(base), manager)
    sampled = [proxy.cid for proxy, _ in instructions]
    outsider = next(c for c in updates if c not in sampled)
    honest = sends(updates, base)
    results = [(IdleProxy(cid), fit_res(*honest(IdleProxy(cid), None)))
               for cid in [*sampled, sampled[0], outsider]]
    params, _ = strategy.aggregate_fit(1, results, [])
    mean = [sum(updates[c][i] for c in sampled) / len(sampled) for i in range(len(base))]
    for got, want in zip(parameters_to_ndarrays(params), mean):
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert f"client {outsider}: not in this round's sample" in caplog.text
    assert f"client {sampled[0]}: a repeat" in caplog.text


def test_client_side_mode_never_logs_a_clients_update_norm(caplog):
    manager, base = client_manager(2), zeros()
    updates = _updates(np.random.default_rng(14), ["c0", "c1"], [0.3, 2.71828])
    play_round(dp_strategy(client_side=True, clipping_norm=1.0), manager, 1, base,
               sends(updates, base))
    assert "clipped on the server" in caplog.text
    assert "2.718" not in caplog.text


def test_distributed_evaluation_is_off_under_dp_unless_asked_for(caplog):
    manager, base = client_manager(3), zeros()
    assert dp_strategy().configure_evaluate(1, ndarrays_to_parameters(base), manager) == []
    asked = dp_strategy(distributed_evaluation=True)
    assert len(asked.configure_evaluate(1, ndarrays_to_parameters(base), manager)) == 3
    assert "outside the privacy guarantee" in caplog.text
