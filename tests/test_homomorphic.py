"""Homomorphic aggregation (CKKS, TenSEAL): the codec, the server's wrapper, the refusals.

The simulation test (real Flower simulation engine) is `tests/test_homomorphic_sim.py`.
"""

from __future__ import annotations

import re
import stat

import numpy as np
import pytest
from flwr.client import NumPyClient
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

from fl_app.protocol import ckks
from fl_app.schema import ConfigError
from fl_app.wire import KEY_HE_ENCRYPTED
from strategies.combinations import homomorphic_problems
from strategies.homomorphic import HomomorphicAggregation, is_encrypted
from strategies.weighted_fedavg import WeightedFedAvg
from tests.conftest import make_config
from tests.flower_objects import IdleProxy, fit_res, random_model

SHAPES = ((70, 64), (64,), (64, 10), (10,))  # 5194 weights: two chunks of 4096 slots
RELATIVE_BOUND = 1e-6  # observed ~1e-9; the README states 1e-4 for whole runs


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A key pair written as deploy.prepare and run_simulation.py write it."""
    folder = tmp_path_factory.mktemp("keys")
    public, secret = folder / ckks.PUBLIC_CONTEXT_FILE, folder / ckks.SECRET_CONTEXT_FILE
    ckks.write_key_pair(public, secret)
    return public, secret


def _relative_error(got, want) -> float:
    flat_got = np.concatenate([np.ravel(g) for g in got]).astype(np.float64)
    flat_want = np.concatenate([np.ravel(w) for w in want]).astype(np.float64)
    return float(np.max(np.abs(flat_got - flat_want)) / np.max(np.abs(flat_want)))


def test_key_files_are_private_and_the_server_side_holds_no_secret(keys):
    public, secret = keys
    for path in keys:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not ckks.load_public_context(public).is_private()
    assert ckks.load_secret_context(secret).is_private()
    with pytest.raises(ConfigError, match="holds a secret key"):
        ckks.load_public_context(secret)
    with pytest.raises(ConfigError, match="holds no secret key"):
        ckks.load_secret_context(public)
    with pytest.raises(ConfigError, match="needs run-config key he-public-context"):
        ckks.load_public_context("")


def test_sum_of_encrypted_updates_decrypts_to_the_weighted_average(keys):
    public, secret = keys
    rng = np.random.default_rng(0)
    updates = [(random_model(rng, SHAPES), n) for n in (120, 45, 301)]
    client = ckks.load_secret_context(secret)
    server = ckks.load_public_context(public)
    sizes = ckks.chunk_sizes(sum(int(np.prod(s)) for s in SHAPES))
    assert sizes == [4096, 1099]
    replies = [ckks.ciphertexts(server, ckks.encrypt_update(client, w, n), sizes)
               for w, n in updates]
    total = ckks.add_encrypted(replies)
    average = ckks.decrypt_average(client, total, updates[0][0])
    want = [sum(n * w[i].astype(np.float64) for w, n in updates) / 466 for i in range(4)]
    assert [a.shape for a in average] == list(SHAPES)
    assert all(a.dtype == np.float32 for a in average)
    assert _relative_error(average, want) <= RELATIVE_BOUND
    with pytest.raises(ValueError, match="doesn't hold a secret_key"):
        ckks.ciphertexts(server, total, sizes)[0].decrypt()


def _wrapper(keys, min_fit_clients=1) -> HomomorphicAggregation:
    initial = random_model(np.random.default_rng(1), SHAPES)
    inner = WeightedFedAvg(initial_parameters=ndarrays_to_parameters(initial))
    return HomomorphicAggregation(inner, public_context=ckks.load_public_context(keys[0]),
                                  num_values=sum(a.size for a in initial),
                                  min_fit_clients=min_fit_clients)


def test_wrapper_adds_ciphertexts_and_rejects_what_is_not_one(keys):
    strategy = _wrapper(keys)
    client = ckks.load_secret_context(keys[1])
    rng = np.random.default_rng(2)
    honest = [(random_model(rng, SHAPES), n) for n in (10, 30)]
    plaintext = random_model(rng, SHAPES)
    good = [(IdleProxy(f"c{i}"), fit_res(ckks.encrypt_update(client, w, n), 1, {"train_loss": i}))
            for i, (w, n) in enumerate(honest)]
    bad = [(IdleProxy("plain"), fit_res(plaintext, 10)),  # a plaintext update
           (IdleProxy("short"), fit_res(ckks.encrypt_update(client, plaintext, 5)[:1], 1)),
           (IdleProxy("junk"), fit_res([np.zeros(100, np.uint8)] * 2, 1))]
    parameters, metrics = strategy.aggregate_fit(1, good + bad, [])
    assert metrics["num_rejected"] == 3 and metrics["train_loss"] == 0.5
    assert is_encrypted(parameters)
    average = ckks.decrypt_average(client, parameters_to_ndarrays(parameters), plaintext)
    want = [(10 * a.astype(np.float64) + 30 * b) / 40 for a, b in zip(*(w for w, _ in honest))]
    assert _relative_error(average, want) <= RELATIVE_BOUND
    assert strategy.evaluate(1, parameters) is None  # no centralized evaluation


def test_wrapper_keeps_the_model_below_min_fit_clients(keys):
    strategy = _wrapper(keys, min_fit_clients=2)
    update = ckks.encrypt_update(ckks.load_secret_context(keys[1]),
                                 random_model(np.random.default_rng(3), SHAPES), 4)
    parameters, metrics = strategy.aggregate_fit(1, [(IdleProxy("c0"), fit_res(update, 1))], [])
    assert parameters is None and metrics["num_rejected"] == 0


def test_wrapper_refuses_a_context_with_a_secret_key(keys):
    inner = WeightedFedAvg()
    with pytest.raises(ValueError, match="must not hold a secret key"):
        HomomorphicAggregation(inner, public_context=ckks.load_secret_context(keys[1]),
                               num_values=10, min_fit_clients=1)


def test_configure_marks_only_the_encrypted_aggregate(keys):
    from fl_app.server.client_manager import SeededClientManager

    strategy = _wrapper(keys)
    manager = SeededClientManager(0)
    for cid in ("c0", "c1"):  # the inner strategy samples at least 2
        manager.register(IdleProxy(cid))
    plain = ndarrays_to_parameters(random_model(np.random.default_rng(4), SHAPES))
    encrypted = ndarrays_to_parameters([np.zeros(3, np.uint8)])
    encrypted.tensor_type = ckks.TENSOR_TYPE
    for parameters, flag in ((plain, False), (encrypted, True)):
        fit = strategy.configure_fit(2, parameters, manager)
        evaluate = strategy.configure_evaluate(2, parameters, manager)
        assert len(fit) == len(evaluate) == 2
        for _, ins in fit + evaluate:
            assert ins.config[KEY_HE_ENCRYPTED] is flag
            assert ins.parameters is parameters


@pytest.mark.parametrize("overrides, problem", [
    ({"strategy": "krum"}, "needs individual updates"),
    ({"strategy": "fedmedian"}, "needs individual updates"),
    ({"strategy": "fedtrimmedavg"}, "needs individual updates"),
    ({"strategy": "bulyan"}, "needs individual updates"),
    ({"strategy": "fedadam"}, "plaintext server-side model"),
    ({"strategy": "dp-fixed"}, "clips and noises on the server"),
    ({"outlier_norm_factor": 3.0}, "outlier-norm-factor"),
    ({"max_examples": 500}, "max-examples"),
    ({"strategy": "fednova"}, "needs individual updates"),
    ({"resume_from": "outputs/x"}, "resume-from"),
    ({"target": 0.9}, "an encrypted run has none"),
])
def test_combinations_that_need_individual_updates_are_refused(overrides, problem):
    with pytest.raises(ConfigError, match=f"homomorphic-encryption='ckks' cannot run with.*"
                                          f"{problem}"):
        make_config(homomorphic_encryption="ckks", **overrides)


@pytest.mark.parametrize("strategy", ["weighted-fedavg", "fedavg", "fedprox"])
def test_linear_strategies_are_accepted(strategy):
    cfg = make_config(homomorphic_encryption="ckks", strategy=strategy)
    assert homomorphic_problems(cfg) == []


def test_prepare_gives_the_nodes_the_secret_key_and_the_server_only_the_public_context(
        tmp_path):
    from deploy.commands import he_run_config, node_config
    from deploy.prepare import instructions, prepare

    dep = prepare(tmp_path / "dep", 2, "homomorphic-encryption='ckks'", ["127.0.0.1"])
    server = ckks.load_public_context(dep.he_public_context)
    assert not server.is_private()
    for node in dep.nodes:
        key = dep.he_key(node)
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert ckks.load_secret_context(key).is_private()
        assert f'he-key-file="{key}"' in node_config(dep, node)
    assert stat.S_IMODE(dep.he_public_context.stat().st_mode) == 0o600
    assert he_run_config(dep) == f'he-public-context="{dep.he_public_context}"'
    assert he_run_config(dep) in instructions(dep)
    # The nodes share one key: what one encrypts, another decrypts.
    one, other = (ckks.load_secret_context(dep.he_key(n)) for n in dep.nodes)
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3)]
    total = ckks.add_encrypted([ckks.ciphertexts(server, ckks.encrypt_update(one, weights, 3),
                                                 [7])])
    assert np.allclose(ckks.decrypt_average(other, total, weights)[0], weights[0], atol=1e-5)


def test_prepare_without_encryption_writes_no_he_keys(tmp_path):
    from deploy.commands import he_run_config
    from deploy.prepare import prepare

    dep = prepare(tmp_path / "dep", 2, "", ["127.0.0.1"])
    assert not (dep.root / "he").exists() and he_run_config(dep) == ""


def test_run_simulation_checks_the_users_key_pair_before_training(tmp_path, capsys):
    import run_simulation

    for name in ("a", "b"):
        ckks.write_key_pair(tmp_path / f"{name}.pub", tmp_path / f"{name}.key")
    ckks.check_key_pair(tmp_path / "a.pub", tmp_path / "a.key")  # one pair: accepted
    with pytest.raises(ckks.KeyFileError, match="are not one key pair"):
        ckks.check_key_pair(tmp_path / "a.pub", tmp_path / "b.key")
    he = f"homomorphic-encryption='ckks' he-public-context='{tmp_path / 'a.pub'}'"
    cases = [
        (["--run-config", he, "--he-key-file", str(tmp_path / "b.key")], "not one key pair"),
        (["--he-key-file", str(tmp_path / "a.key")], "homomorphic-encryption is 'none'"),
        (["--run-config", he], "needs both"),
    ]
    for argv, message in cases:
        assert run_simulation.main(["--check", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err
    from sklearn.datasets import load_digits

    from fl_app.api import run

    x, y = load_digits(return_X_y=True)
    with pytest.raises(ConfigError, match="needs both"):  # the notebook entry point too
        run("mlp", x, y, num_clients=2, out_dir=str(tmp_path / "out"),
            homomorphic_encryption="ckks", he_public_context=str(tmp_path / "a.pub"))


def _chunks(vectors) -> list[np.ndarray]:
    """TenSEAL vectors serialized as a reply's uint8 chunks."""
    return [np.frombuffer(v.serialize(), dtype=np.uint8) for v in vectors]


def _deviating_replies(secret_path, weights) -> dict[str, list[np.ndarray]]:
    """Replies a deviating client could send, each well-formed in size (one ciphertext per
    chunk with the right number of slots) but not addable to honest ones."""
    import tenseal as ts

    size = sum(w.size for w in weights) + 1
    other_scale = ckks.load_secret_context(secret_path)  # the shared key, scale 2^30
    other_scale.global_scale = 2.0 ** 30
    lower = ckks.load_secret_context(secret_path)  # a rescaled ciphertext: one level lower
    lowered = [ts.ckks_vector_from(lower, c.tobytes()) * np.ones(s).tolist()
               for c, s in zip(ckks.encrypt_update(lower, weights, 7), ckks.chunk_sizes(size - 1))]
    product = ckks.load_secret_context(secret_path)  # 2^20·2^20 = 2^40, three polynomials
    product.global_scale, product.auto_relin, product.auto_rescale = 2.0 ** 20, False, False
    squared = [ts.ckks_vector_from(product, c.tobytes()) ** 2
               for c in ckks.encrypt_update(product, weights, 7)]
    bigger = ts.context(ts.SCHEME_TYPE.CKKS, 16384, coeff_mod_bit_sizes=[60, 40, 40, 60])
    bigger.global_scale = 2.0 ** 40
    return {"scale-2^30": ckks.encrypt_update(other_scale, weights, 7),
            "lower-level": _chunks(lowered),
            "unrelinearized": _chunks(squared),
            "other-context": ckks.encrypt_update(bigger, weights, 7)}


def test_a_reply_at_another_scale_or_with_other_parameters_is_rejected_and_the_round_goes_on(
        keys, caplog):
    strategy = _wrapper(keys)
    client = ckks.load_secret_context(keys[1])
    rng = np.random.default_rng(5)
    honest = [(random_model(rng, SHAPES), n) for n in (12, 36)]
    good = [(IdleProxy(f"c{i}"), fit_res(ckks.encrypt_update(client, w, n), 1))
            for i, (w, n) in enumerate(honest)]
    deviating = _deviating_replies(keys[1], honest[0][0])
    bad = [(IdleProxy(name), fit_res(reply, 1)) for name, reply in deviating.items()]
    with caplog.at_level("WARNING"):
        parameters, metrics = strategy.aggregate_fit(3, bad[:2] + good + bad[2:], [])
    assert metrics["num_rejected"] == len(bad)
    for name, reason in [("scale-2^30", "at scale 2^30, expected 2^40"),
                         ("lower-level", "other parameters or at another level (1 "),
                         ("unrelinearized", "(3 polynomials, expected 2)"),
                         ("other-context", "not a CKKS ciphertext of this context")]:
        assert f"rejected the update of client {name}: chunk 0 " in caplog.text
        assert reason in caplog.text, (name, caplog.text)
    average = ckks.decrypt_average(client, parameters_to_ndarrays(parameters), honest[0][0])
    want = [(12 * a.astype(np.float64) + 36 * b) / 48 for a, b in zip(*(w for w, _ in honest))]
    assert _relative_error(average, want) <= RELATIVE_BOUND


class _Weights(NumPyClient):
    """A client that only knows its model's shapes (what HomomorphicClient decrypts into);
    its `fit` "trains" by adding `step` to what it was sent, on 37 examples, and records
    what it was sent."""

    def __init__(self, weights, step: float = 0.5) -> None:
        self.weights, self.step, self.sent = weights, step, []

    def get_parameters(self, config):
        """The local model's initial weights (their shapes and dtypes)."""
        return self.weights

    def fit(self, parameters, config):
        """The sent weights plus `step`, on 37 examples."""
        self.sent.append(parameters)
        return [p + self.step for p in parameters], 37, {"local_steps": 3}


def _shifted_count(public, reply, num_values: int, shift: float) -> list[np.ndarray]:
    """What an active server with the public context only can send as the aggregate:
    `reply` with `shift` added to its count slot (a plaintext added to a ciphertext keeps
    its level and scale, so the parameter checks pass), as in /tmp/review19/he_oracle.py."""
    vectors = ckks.ciphertexts(public, reply, ckks.chunk_sizes(num_values))
    vectors[-1] = vectors[-1] + ([0.0] * (vectors[-1].size() - 1) + [shift])
    return [np.frombuffer(v.serialize(), dtype=np.uint8) for v in vectors]


def test_a_forged_count_gets_the_same_kind_of_fit_reply_so_no_bit_leaks(keys, caplog):
    """The server shifts a victim's encrypted count by -t and sends it back as the
    aggregate: with an error on a count <= 0.5 it would learn whether the count exceeds t
    (a binary search on the count, 10 probes). Now every probe gets a normal reply, of the
    form, and the node trains from its initial weights on a forged count. (A serialized
    ciphertext's length varies with its random coefficients, not with what it encrypts.)"""
    from fl_app.client.homomorphic import HomomorphicClient

    initial = [np.zeros((3, 2), np.float32)]
    secret = ckks.load_secret_context(keys[1])
    public = ckks.load_public_context(keys[0])
    victim = ckks.encrypt_update(secret, [np.full((3, 2), 0.25, np.float32)], 37)
    inner = _Weights(initial)
    client = HomomorphicClient(inner, secret)
    replies = {}
    for t in (0, 36, 37, 512):  # count 37 - t: 37, 1 (honest-looking), 0, -475
        arrays, n, metrics = client.fit(_shifted_count(public, victim, 6, -float(t)),
                                        {KEY_HE_ENCRYPTED: True})
        replies[t] = arrays
        assert n == 1 and metrics == {"local_steps": 3}
    for arrays in replies.values():  # each a well-formed one-chunk reply, as the server sees
        assert len(ckks.ciphertexts(public, arrays, ckks.chunk_sizes(6))) == 1
    # 37 and 1 decrypt to weights (0.25 and 9.25); 0 and -475 are forged: initial weights.
    expected = {0: 0.25, 36: 9.25, 37: 0.0, 512: 0.0}
    for sent, (t, want) in zip(inner.sent, expected.items()):
        assert np.allclose(sent[0], want, atol=1e-4), (t, sent)
    assert caplog.text.count("a forged aggregate") == 2
    for t, arrays in replies.items():  # every reply is a real update: sent weights + 0.5
        reply = ckks.decrypt_average(secret, arrays, initial)
        assert np.allclose(reply[0], expected[t] + 0.5, atol=1e-3), t


def test_trained_weights_that_cannot_be_encrypted_send_the_initial_weights(keys, caplog):
    """Training on forged weights may give NaN or huge weights, which TenSEAL would refuse
    (an error, another one-bit oracle): the node sends its initial weights instead."""
    from fl_app.client.homomorphic import HomomorphicClient

    initial = [np.full((2, 2), 0.125, np.float32)]
    secret = ckks.load_secret_context(keys[1])
    for step in (np.nan, np.inf, 1e17):
        arrays, n, _ = HomomorphicClient(_Weights(initial, step), secret).fit(initial, {})
        assert n == 1
        assert np.allclose(ckks.decrypt_average(secret, arrays, initial)[0], 0.125, atol=1e-4)
    assert caplog.text.count("not finite or too large") == 3
    assert ckks.encodable(initial, 37) and not ckks.encodable([np.array([2.0 ** 45])], 37)


@pytest.mark.parametrize("count", [-25.137, 0.0371])
def test_a_bad_encrypted_count_is_refused_without_quoting_a_decrypted_value(keys, count):
    """An active server can encrypt anything under the public context and send it as the
    aggregate (e.g. one client's reply): evaluation's error must not decrypt it back (fit
    answers as usual, above)."""
    import tenseal as ts

    from fl_app.client.homomorphic import HomomorphicClient

    weights = [np.array([[3.25, -11.5], [0.875, 42.0]], np.float32)]
    server = ckks.load_public_context(keys[0])
    payload = [np.frombuffer(ts.ckks_vector(server, [3.25, -11.5, 0.875, 42.0, count])
                             .serialize(), dtype=np.uint8)]
    client = HomomorphicClient(_Weights(weights), ckks.load_secret_context(keys[1]))
    with pytest.raises(ValueError) as err:
        client.evaluate(payload, {KEY_HE_ENCRYPTED: True})
    numbers = [float(n) for n in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", str(err.value))]
    assert not [n for n in numbers if n != 0 and np.isclose(
        [count, abs(count), 3.25, -11.5, 0.875, 42.0], n, rtol=1e-2).any()], str(err.value)
    assert "example count is not a positive count" in str(err.value)
