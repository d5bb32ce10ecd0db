"""Fault injection and attacks: who misbehaves, and how (real KerasClients on digits)."""

from __future__ import annotations

import numpy as np
import pytest

from fl_app.app.local_client import client_for
from fl_app.client.faults import GARBAGE_KINDS, FaultSettings, FaultyClient, assign_roles
from fl_app.schema import ConfigError
from fl_app.wire import round_config
from strategies.validation import update_problem
from tests.conftest import make_config

N = 10


def _node(pid: int) -> dict:
    return {"partition-id": pid, "num-partitions": N}


def _global_model() -> list[np.ndarray]:
    """A global model to send: the shared trainer's current weights, copied."""
    return [np.array(w) for w in client_for(make_config(), _node(0)).get_parameters({})]


def _fit(cfg, pid: int, server_round: int = 1, sent: list[np.ndarray] | None = None):
    sent = _global_model() if sent is None else sent
    weights, n, _ = client_for(cfg, _node(pid)).fit(sent, round_config(cfg, server_round))
    return sent, weights, n


def test_roles_are_deterministic_disjoint_and_sized_by_the_fractions():
    cfg = make_config(fault_raise_fraction=0.3, fault_nan_fraction=0.1, attack="sign-flip",
                      attack_fraction=0.2)
    roles = assign_roles(FaultSettings.from_config(cfg), N)
    assert roles == assign_roles(FaultSettings.from_config(cfg), N)
    counts = {role: list(roles.values()).count(role) for role in set(roles.values())}
    assert counts == {"raise": 3, "nan": 1, "sign-flip": 2}
    assert assign_roles(FaultSettings.from_config(cfg.replace(seed=7)), N) != roles


def test_fractions_adding_up_to_more_than_one_are_a_config_error():
    """Refused when the config is resolved, before any simulation starts."""
    with pytest.raises(ConfigError, match="fault-raise-fraction.*attack-fraction"):
        make_config(fault_raise_fraction=0.6, attack="scale", attack_fraction=0.5)
    with pytest.raises(ConfigError, match="at most 1"):
        make_config(fault_nan_fraction=0.7, fault_garbage_fraction=0.4)
    make_config(fault_raise_fraction=0.6, attack="none", attack_fraction=0.5)  # no attack


def test_clients_without_a_role_are_plain_clients():
    cfg = make_config(fault_raise_fraction=0.3, local_epochs=1)
    honest = [pid for pid in range(N) if pid not in assign_roles(FaultSettings.from_config(cfg), N)]
    assert not isinstance(client_for(cfg, _node(honest[0])), FaultyClient)


def test_raising_client_raises_in_fit_and_evaluate():
    cfg = make_config(fault_raise_fraction=1.0, local_epochs=1)
    client = client_for(cfg, _node(0))
    weights = _global_model()
    with pytest.raises(RuntimeError, match="injected fault: client 0 raises in fit"):
        client.fit(weights, round_config(cfg, 1))
    with pytest.raises(RuntimeError, match="raises in evaluate"):
        client.evaluate(weights, {})


def test_nan_client_returns_nan_weights_that_validation_rejects():
    cfg = make_config(fault_nan_fraction=1.0, local_epochs=1)
    sent, weights, n = _fit(cfg, 3)
    assert all(np.isnan(w).all() for w in weights)
    assert "NaN" in update_problem(weights, n, sent)


def test_garbage_clients_cycle_through_kinds_that_validation_all_rejects():
    cfg = make_config(fault_garbage_fraction=1.0, local_epochs=1)
    problems = set()
    for server_round in range(len(GARBAGE_KINDS)):
        sent, weights, n = _fit(cfg, 2, server_round)
        problem = update_problem(weights, n, sent)
        assert problem is not None
        problems.add(problem.split(" ")[0] + problem.split(" ")[-1])
    assert len(problems) == len(GARBAGE_KINDS)


@pytest.mark.parametrize("attack,factor", [("sign-flip", -10.0), ("scale", 10.0)])
def test_update_attacks_send_a_scaled_copy_of_the_honest_update(attack, factor):
    sent, honest, _ = _fit(make_config(local_epochs=1), 4)
    cfg = make_config(local_epochs=1, attack=attack, attack_fraction=1.0, attack_scale=10.0)
    _, poisoned, n = _fit(cfg, 4, sent=sent)
    for g, h, p in zip(sent, honest, poisoned):
        np.testing.assert_allclose(p - g, factor * (h - g), rtol=1e-4, atol=1e-5)
    assert update_problem(poisoned, n, sent) is None  # well-formed: only robust rules help


def test_gaussian_attack_sends_noise_of_the_configured_scale():
    cfg = make_config(local_epochs=1, attack="gaussian", attack_fraction=1.0,
                      attack_noise_std=0.5)
    sent, poisoned, _ = _fit(cfg, 1)
    noise = np.concatenate([(p - g).ravel() for g, p in zip(sent, poisoned)])
    assert noise.std() == pytest.approx(0.5, rel=0.05)
    assert _fit(cfg, 1, sent=sent)[1][0].tolist() == poisoned[0].tolist()  # seeded


def test_label_flip_attacker_trains_on_flipped_labels():
    cfg = make_config(local_epochs=1, attack="label-flip", attack_fraction=1.0)
    flipped = client_for(cfg, _node(5))
    honest = client_for(make_config(local_epochs=1), _node(5))
    np.testing.assert_array_equal(flipped.data.train.y, 9 - honest.data.train.y)
    np.testing.assert_array_equal(flipped.data.train.x, honest.data.train.x)


def test_fault_keys_outside_simulation_are_a_clear_error(tmp_path):
    path = tmp_path / "node.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.random((20, 64)).astype(np.float32), y=rng.integers(0, 10, 20))
    with pytest.raises(ConfigError, match="partition-id"):
        client_for(make_config(fault_nan_fraction=0.5), {"data-path": str(path)})
