"""Every registered strategy declares what it combines with, and the refusals follow the flags."""

from __future__ import annotations

import pytest

from fl_app.schema import ConfigError
from strategies import combinations
from strategies.combinations import SPECS
from strategies.registry import STRATEGIES, WRAPPERS, strategy_names
from strategies.spec import FLAGS, StrategySpec
from tests.conftest import make_config

# The settings each mode's rule needs on, with everything else at its default.
MODES = {
    "sums": dict(secure_aggregation="secagg+", examples_cap_factor=0.0),
    "linear": dict(homomorphic_encryption="ckks"),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_registered_spec_sets_every_flag(name):
    assert SPECS[name].unset_flags() == []
    assert SPECS[name].name == name


def test_the_registry_is_the_specs():
    assert set(strategy_names()) == set(SPECS)
    assert set(WRAPPERS) == {name for name, spec in SPECS.items() if spec.wrapper}
    assert all(STRATEGIES[name] is SPECS[name].build for name in STRATEGIES)


def test_the_flags_say_what_the_aggregations_are():
    assert combinations.names_with("linear") == ["weighted-fedavg", "fedavg", "fedprox"]
    assert set(combinations.names_with("sums")) == {
        "weighted-fedavg", "fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm"}
    assert {name for name in STRATEGIES if not SPECS[name].can("takes_private_average")} == {
        "fednova", "qfedavg"}
    assert [name for name in WRAPPERS if SPECS[name].can("sums")] == ["dp-client-fixed"]


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("flag, mode", [
    ("sums", "secure-aggregation"), ("linear", "homomorphic-encryption"),
    ("linear", "server-loop")])
def test_each_mode_refuses_exactly_the_strategies_without_its_flag(name, flag, mode):
    overrides = MODES.get(flag, {}) if mode != "server-loop" else dict(server_loop="fedbuff")
    # DP wrappers are never linear: homomorphic encryption refuses them all.
    accepted = SPECS[name].can(flag) and not (mode == "homomorphic-encryption"
                                              and SPECS[name].wrapper)
    if accepted:
        make_config(strategy=name, **overrides)
        return
    with pytest.raises(ConfigError, match=mode) as err:
        make_config(strategy=name, **overrides)
    assert name in str(err.value)


def test_a_strategy_that_declares_nothing_is_refused_with_everything_secure(monkeypatch):
    bare = StrategySpec("new-strategy", lambda ctx: None)
    assert bare.unset_flags() == list(FLAGS)
    monkeypatch.setitem(SPECS, bare.name, bare)
    base = dict(make_config())
    for overrides, mode in [({"secure-aggregation": "secagg+", "examples-cap-factor": 0.0},
                             "secure-aggregation"),
                            ({"homomorphic-encryption": "ckks"}, "homomorphic-encryption"),
                            ({"server-loop": "fedbuff"}, "server-loop")]:
        with pytest.raises(ConfigError, match=mode) as err:
            combinations.check_config({**base, "strategy": bare.name, **overrides})
        assert "new-strategy" in str(err.value) and "does not declare" in str(err.value)
    with pytest.raises(ConfigError, match="dp-inner.*does not declare"):
        combinations.check_config({**base, "strategy": "dp-fixed", "dp-inner": bare.name})
    combinations.check_config({**base, "strategy": bare.name})  # a plain run takes it


def test_an_unknown_flag_is_an_error_not_a_refusal():
    with pytest.raises(KeyError, match="unknown capability flag"):
        SPECS["fedavg"].can("linaer")
