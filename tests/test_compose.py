"""`strategies.compose.compose` builds the server's whole strategy chain in its one order:
the chain's `repr()` per mode."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters

from fl_app.protocol import ckks
from strategies.compose import compose
from strategies.context import StrategyContext
from tests.conftest import make_config

INITIAL = ndarrays_to_parameters([np.zeros((4, 3), np.float32), np.zeros(3, np.float32)])
FEDAVG = "WeightedFedAvg(accept_failures=True)"
DP = "z=1.0, C=1, rdp/fixed"


def chain(**config) -> str:
    return repr(compose(StrategyContext(make_config(**config), INITIAL)))


@pytest.mark.parametrize("config, want", [
    ({}, f"WireMeter(ValidatedStrategy({FEDAVG}))"),
    (dict(strategy="fedadam"), "WireMeter(ValidatedStrategy(FedAdam(accept_failures=True)))"),
    (dict(strategy="dp-fixed", dp_inner="fedadam"),
     "WireMeter(ValidatedStrategy(DPFixedClipping(FedAdam(accept_failures=True), "
     f"server-side, {DP})))"),
    (dict(strategy="dp-client-fixed"),
     f"WireMeter(ValidatedStrategy(DPFixedClipping({FEDAVG}, client-side, {DP})))"),
    (dict(strategy="dp-client-fixed", secure_aggregation="secagg+", examples_cap_factor=0.0),
     f"WireMeter(ValidatedStrategy(DistributedDPFixedClipping({FEDAVG}, client-side, {DP})))"),
    (dict(straggler_fraction=0.3, strategy="fedprox", local_epochs=2),
     "WireMeter(ValidatedStrategy(Stragglers(FedProx(accept_failures=True), fraction=0.3, "
     "policy=keep)))"),
    (dict(compress_up="int8", compress_down="fp16", prune_sparsity=0.5, prune_rounds=4),
     f"WireMeter(CompressedStrategy(PrunedStrategy(ValidatedStrategy({FEDAVG}), sparsity=0.5, "
     "rounds=4), up=int8, down=fp16))"),
    (dict(strategy="dp-fixed", straggler_fraction=0.2, compress_up="int8"),
     f"WireMeter(CompressedStrategy(ValidatedStrategy(Stragglers(DPFixedClipping({FEDAVG}, "
     f"server-side, {DP}), fraction=0.2, policy=drop)), up=int8, down=none))"),
])
def test_each_mode_composes_its_chain(config, want):
    assert chain(**config) == want


def test_homomorphic_encryption_adds_ciphertexts_outside_the_validated_chain(tmp_path):
    public, secret = tmp_path / ckks.PUBLIC_CONTEXT_FILE, tmp_path / ckks.SECRET_CONTEXT_FILE
    ckks.write_key_pair(public, secret)
    assert chain(homomorphic_encryption="ckks", he_public_context=str(public),
                 straggler_fraction=0.3) == (
        f"WireMeter(HomomorphicAggregation(ValidatedStrategy(Stragglers({FEDAVG}, "
        "fraction=0.3, policy=drop))))")


def test_meter_false_leaves_out_the_byte_meter():
    assert repr(compose(StrategyContext(make_config(), INITIAL), meter=False)) == (
        f"ValidatedStrategy({FEDAVG})")
