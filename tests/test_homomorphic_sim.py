"""Homomorphic aggregation on Flower's simulation engine, through run_simulation.py.

A spy wraps the strategy the ServerApp builds and keeps what it receives and returns:
under `homomorphic-encryption=ckks` those are ciphertexts the server's own context cannot
decrypt, and their decrypted sum equals the plaintext run's weighted average.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.common import parameters_to_ndarrays

import run_simulation
from fl_app.app import server_app
from fl_app.protocol import ckks
from strategies.compose import compose
from strategies.homomorphic import HomomorphicAggregation, is_encrypted
from strategies.protocols import find_layer
from strategies.wrapper import StrategyWrapper

pytestmark = pytest.mark.slow  # runs Flower simulations

CONFIG = ("num-server-rounds=2 local-epochs=1 min-fit-clients=3 min-available-clients=3 "
          "min-evaluate-clients=3")
RELATIVE_BOUND = 1e-4  # the stated CKKS bound for an aggregate (observed ~1e-8)


class Spy(StrategyWrapper):
    """Keeps every fit result the server's strategy receives and every aggregate it returns."""

    def __init__(self, inner, log: dict) -> None:
        super().__init__(inner)
        self.log = log
        log.update(strategy=inner, received=[], aggregates=[])

    def aggregate_fit(self, server_round, results, failures):
        """Record, then delegate."""
        self.log["received"] += [parameters_to_ndarrays(res.parameters) for _, res in results]
        parameters, metrics = self.inner.aggregate_fit(server_round, results, failures)
        self.log["aggregates"].append(parameters)
        return parameters, metrics


def _run(tmp_path, monkeypatch, run_config: str, extra: list[str] = ()) -> tuple[dict, dict]:
    log: dict = {}
    monkeypatch.setattr(server_app, "compose", lambda ctx: Spy(compose(ctx), log))
    out = tmp_path / "out"
    code = run_simulation.main(["--num-supernodes", "3", "--run-config",
                                f"{CONFIG} {run_config}", "--out", str(out), *extra])
    assert code == 0
    return json.loads((out / "history.json").read_text()), log


def _relative_error(got, want) -> float:
    flat_got = np.concatenate([np.ravel(g) for g in got]).astype(np.float64)
    flat_want = np.concatenate([np.ravel(w) for w in want]).astype(np.float64)
    return float(np.max(np.abs(flat_got - flat_want)) / np.max(np.abs(flat_want)))


def test_encrypted_aggregate_equals_the_plaintext_weighted_average(tmp_path, monkeypatch):
    public, secret = tmp_path / "public.bin", tmp_path / "secret.bin"
    ckks.write_key_pair(public, secret)
    plain_history, plain = _run(tmp_path / "plain", monkeypatch, "")
    he_history, he = _run(tmp_path / "he", monkeypatch,
                          f"homomorphic-encryption='ckks' he-public-context='{public}'",
                          ["--he-key-file", str(secret)])

    # The server's strategy got only ciphertexts, and its context cannot decrypt them.
    server = find_layer(he["strategy"], HomomorphicAggregation)
    assert server is not None and not server.context.is_private()
    assert len(he["received"]) == 6
    sizes = server.sizes
    for reply in he["received"]:
        assert all(a.dtype == np.uint8 and a.ndim == 1 for a in reply)
        vectors = ckks.ciphertexts(server.context, reply, sizes)
        with pytest.raises(ValueError, match="doesn't hold a secret_key"):
            vectors[0].decrypt()

    # Each round's encrypted aggregate decrypts (with a node's key) to the plaintext run's.
    key = ckks.load_secret_context(secret)
    for encrypted, plaintext in zip(he["aggregates"], plain["aggregates"], strict=True):
        assert is_encrypted(encrypted) and not is_encrypted(plaintext)
        want = parameters_to_ndarrays(plaintext)
        got = ckks.decrypt_average(key, parameters_to_ndarrays(encrypted), want)
        assert _relative_error(got, want) <= RELATIVE_BOUND

    # No evaluation during the run: the server holds only ciphertexts, and a client's
    # evaluation reply (loss, validation-set size) would be in the clear, so none is asked.
    he_round, plain_round = he_history["rounds"][-1], plain_history["rounds"][-1]
    assert "centralized" not in he_round and "distributed" not in he_round
    assert "distributed" in plain_round
    # A node decrypted the final aggregate into the run's model.
    assert (tmp_path / "he" / "out" / "final_model.keras").is_file()
    assert (tmp_path / "he" / "out" / "final_model.ckks.npz").is_file()
