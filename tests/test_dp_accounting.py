"""Privacy accounting: ε per round against dp-accounting computed independently, budgets."""

from __future__ import annotations

import math

import numpy as np
import pytest
from dp_accounting import (
    ComposedDpEvent,
    GaussianDpEvent,
    NeighboringRelation,
    PoissonSampledDpEvent,
    SampledWithoutReplacementDpEvent,
)
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

from fl_app.app.config import check_num_clients
from fl_app.schema import ConfigError
from strategies.accounting import PrivacyAccountant, default_delta
from strategies.compose import compose
from strategies.context import StrategyContext
from strategies.protocols import PrivacyAccounting, find_layer
from tests.conftest import make_config
from tests.dp_rounds import client_manager, dp_strategy, play_round, zeros
from tests.flower_objects import fit_res

N = 40


def _epsilons(strategy, rounds: int, num_clients: int = N) -> list[float]:
    manager = client_manager(num_clients)
    strategy.initialize_parameters(manager)
    base, out = zeros(), []
    for r in range(1, rounds + 1):
        new, _, _ = play_round(strategy, manager, r, base, lambda p, i: (base, 1, {}))
        assert new is not None
        out.append(strategy.privacy_report(r)["epsilon"])
    return out


def _independent(event, rounds: int, relation, accountant_cls=RdpAccountant) -> list[float]:
    delta = 1e-5
    out = []
    for t in range(1, rounds + 1):
        accountant = accountant_cls(neighboring_relation=relation)
        accountant.compose(event, t)
        out.append(accountant.get_epsilon(delta))
    return out


def test_rdp_fixed_sampling_matches_dp_accounting_and_grows_with_rounds():
    """m = 8 of N = 40 without replacement; replace-one relation (sensitivity 2C, so the
    Gaussian event's multiplier is z/2)."""
    z = 1.5
    ours = _epsilons(dp_strategy(noise_multiplier=z, fraction_fit=0.2), rounds=4)
    event = SampledWithoutReplacementDpEvent(N, 8, GaussianDpEvent(z / 2))
    expected = _independent(event, 4, NeighboringRelation.REPLACE_ONE)
    assert ours == pytest.approx(expected, rel=1e-6)
    assert all(a < b for a, b in zip(ours, ours[1:]))


@pytest.mark.parametrize("kind, accountant_cls", [("rdp", RdpAccountant), ("pld", PLDAccountant)])
def test_poisson_sampling_matches_dp_accounting(kind, accountant_cls):
    z, rate = 1.2, 0.5  # (1 - q)^N = 9e-13: an empty sample is far less likely than δ
    accountant = PrivacyAccountant(kind, "poisson", poisson_rate=rate)
    ours = _epsilons(dp_strategy(noise_multiplier=z, fraction_fit=rate, accountant=accountant),
                     rounds=3)
    event = PoissonSampledDpEvent(rate, GaussianDpEvent(z))
    expected = _independent(event, 3, NeighboringRelation.ADD_OR_REMOVE_ONE, accountant_cls)
    assert ours == pytest.approx(expected, rel=1e-6)
    assert all(a < b for a, b in zip(ours, ours[1:]))


def test_epsilon_shrinks_as_the_noise_multiplier_grows():
    finals = [_epsilons(dp_strategy(noise_multiplier=z, fraction_fit=0.2), rounds=2)[-1]
              for z in (0.8, 1.6, 3.2)]
    assert finals[0] > finals[1] > finals[2] > 0


def test_adaptive_clipping_accounts_for_the_clipped_count_query():
    """The update noise z_Δ and the count noise σ_b (sensitivity 1/2) compose, in
    dp-accounting, to the configured z; the update query alone would cost less."""
    z, count_stddev = 1.0, 2.0
    ours = _epsilons(dp_strategy(adaptive=True, noise_multiplier=z, fraction_fit=0.2,
                                 clipped_count_stddev=count_stddev), rounds=3)
    z_update = (z ** -2 - (2 * count_stddev) ** -2) ** -0.5
    both = ComposedDpEvent([GaussianDpEvent(z_update / 2), GaussianDpEvent(count_stddev)])
    expected = _independent(SampledWithoutReplacementDpEvent(N, 8, both), 3,
                            NeighboringRelation.REPLACE_ONE)
    assert ours == pytest.approx(expected, rel=1e-6)
    update_only = _independent(
        SampledWithoutReplacementDpEvent(N, 8, GaussianDpEvent(z_update / 2)), 3,
        NeighboringRelation.REPLACE_ONE)
    assert all(o > u for o, u in zip(ours, update_only))


def test_delta_defaults_to_at_most_1e_5_and_far_below_one_over_n_or_takes_the_target():
    strategy = dp_strategy(noise_multiplier=1.0)
    _epsilons(strategy, rounds=1)
    assert strategy.privacy_report(1)["delta"] == 1e-5
    fixed = dp_strategy(noise_multiplier=1.0, accountant=PrivacyAccountant(target_delta=1e-6))
    _epsilons(fixed, rounds=1)
    assert fixed.privacy_report(1)["delta"] == 1e-6
    for n in (2, 10, 20, 1000, 10**6):
        assert default_delta(n) <= min(1e-5, 0.1 / n)


@pytest.mark.parametrize("delta", [1 / N, 0.1])
def test_a_target_delta_of_at_least_one_over_n_is_refused_naming_the_key(delta):
    strategy = dp_strategy(noise_multiplier=1.0, accountant=PrivacyAccountant(target_delta=delta))
    with pytest.raises(ConfigError, match="'target-delta'.*below 1/N"):
        _epsilons(strategy, rounds=1)
    with pytest.raises(ConfigError, match="'target-delta'.*below 1/N"):
        check_num_clients(make_config(strategy="dp-fixed", target_delta=delta), N)


def test_budget_refuses_the_round_that_would_exceed_it():
    z = 2.0
    eps = _independent(SampledWithoutReplacementDpEvent(N, 8, GaussianDpEvent(z / 2)), 3,
                       NeighboringRelation.REPLACE_ONE)
    strategy = dp_strategy(noise_multiplier=z, fraction_fit=0.2, max_epsilon=(eps[1] + eps[2]) / 2)
    manager = client_manager(N)
    strategy.initialize_parameters(manager)
    base = zeros()
    for r in (1, 2):
        assert strategy.budget_allows(r, manager)
        new, _, _ = play_round(strategy, manager, r, base, lambda p, i: (base, 1, {}))
        assert new is not None
    assert not strategy.budget_allows(3, manager)
    # configure_fit enforces it too (e.g. under Flower's plain server loop)
    assert strategy.configure_fit(3, ndarrays_to_parameters(base), manager) == []
    assert strategy.privacy_report(3)["epsilon"] == pytest.approx(eps[1], rel=1e-6)


def test_no_noise_means_no_privacy_report_and_no_budget():
    strategy = dp_strategy(noise_multiplier=0.0, max_epsilon=100.0)
    manager = client_manager(4)
    strategy.initialize_parameters(manager)
    assert not strategy.budget_allows(1, manager)
    assert strategy.privacy_report(1) is None
    accountant = PrivacyAccountant()
    accountant.fix_delta(4)
    accountant.record(accountant.event(0.0, 4, 4))
    assert math.isinf(accountant.epsilon())


def _build(**overrides):
    cfg = make_config(**overrides)
    return compose(StrategyContext(cfg=cfg, initial_parameters=ndarrays_to_parameters(
        zeros())))


def test_pld_with_fixed_size_sampling_is_refused_with_a_clear_error():
    with pytest.raises(ConfigError, match="accountant='pld'.*dp-sampling='poisson'"):
        _build(strategy="dp-fixed", accountant="pld")
    assert _build(strategy="dp-fixed", accountant="pld", dp_sampling="poisson")


def test_adaptive_with_too_little_count_noise_is_refused():
    with pytest.raises(ConfigError, match="clipped-count-stddev"):
        _build(strategy="dp-adaptive", noise_multiplier=1.0, clipped_count_stddev=0.4)


@pytest.mark.parametrize("name", ["dp-fixed", "dp-adaptive", "dp-client-fixed",
                                  "dp-client-adaptive"])
def test_registry_builds_each_dp_strategy_around_the_named_inner_strategy(name):
    strategy = find_layer(_build(strategy=name, dp_inner="fedadam"), PrivacyAccounting)
    assert "FedAdam" in repr(strategy.inner)
    assert strategy.client_side == name.startswith("dp-client")


def test_poisson_sampling_whose_empty_sample_is_not_far_below_delta_is_refused():
    accountant = PrivacyAccountant("rdp", "poisson", poisson_rate=0.25)  # 0.75^40 = 1e-5
    with pytest.raises(ConfigError, match=r"dp-sampling='poisson'.*\(1-q\)\^N"):
        _epsilons(dp_strategy(noise_multiplier=1.0, fraction_fit=0.25, accountant=accountant),
                  rounds=1)
    with pytest.raises(ConfigError, match="dp-sampling='poisson'"):
        check_num_clients(make_config(strategy="dp-fixed", dp_sampling="poisson",
                                      fraction_fit=0.25), N)
    check_num_clients(make_config(strategy="dp-fixed", dp_sampling="poisson",
                                  fraction_fit=0.5), N)


@pytest.mark.parametrize("sampling, rate, relation", [("fixed", 0.2, "replace-one"),
                                                      ("poisson", 0.5, "add-remove")])
def test_the_privacy_report_names_the_relation_and_what_it_does_not_cover(sampling, rate,
                                                                          relation):
    accountant = PrivacyAccountant("rdp", sampling, poisson_rate=rate)
    strategy = dp_strategy(noise_multiplier=1.0, fraction_fit=rate, accountant=accountant)
    _epsilons(strategy, rounds=1)
    report = strategy.privacy_report(1)
    assert report["relation"] == relation
    assert "distributed" in report["not_covered"] and "fit.num_rejected" in report["not_covered"]


def test_a_stateful_inner_strategy_steps_every_round_even_below_min_fit_clients(caplog):
    """Poisson sampling may draw fewer clients than min-fit-clients; the inner FedAdam must
    still take its step (its moments would otherwise drift from the model), not decline and
    leave the wrapper to apply the release as a plain step."""
    from flwr.server.strategy import FedAdam

    strategy = _build(strategy="dp-fixed", dp_inner="fedadam", dp_sampling="poisson",
                      fraction_fit=0.5, min_fit_clients=30, min_available_clients=30,
                      noise_multiplier=1.0)
    fedadam = find_layer(strategy, PrivacyAccounting).inner
    while not isinstance(fedadam, FedAdam):
        fedadam = fedadam.inner
    manager = client_manager(N)
    strategy.initialize_parameters(manager)
    base = zeros()
    for server_round in (1, 2):
        instructions = strategy.configure_fit(server_round, ndarrays_to_parameters(base),
                                              manager)
        assert 0 < len(instructions) < 30
        results = [(proxy, fit_res([b + 0.1 for b in base], 1)) for proxy, _ in instructions]
        params, _ = strategy.aggregate_fit(server_round, results, [])
        assert params is not None and fedadam.m_t is not None
        np.testing.assert_allclose(parameters_to_ndarrays(params)[0],
                                   fedadam.current_weights[0], atol=1e-6)
        base = parameters_to_ndarrays(params)
    assert "returned no model" not in caplog.text


def test_the_population_checks_run_once_so_clients_leaving_mid_run_cannot_crash_it():
    accountant = PrivacyAccountant(target_delta=0.05)
    assert accountant.fix_delta(10) == 0.05  # 0.05 < 1/10: accepted at the start
    assert accountant.fix_delta(30) == 0.05  # later populations do not re-run the check
    with pytest.raises(ConfigError, match="'target-delta'"):
        PrivacyAccountant(target_delta=0.05).fix_delta(30)
