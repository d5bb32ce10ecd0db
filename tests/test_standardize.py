"""Federated standardization (`standardize=true`): the clients' sums pool to the central
statistics, the final model takes raw inputs, and the seed case trains where raw data does not."""

from __future__ import annotations

import io
import json
import logging
import zipfile

import keras
import numpy as np
import pytest
from sklearn.datasets import load_diabetes

import run_simulation
from fl_app.app.config import check_num_clients
from fl_app.app.local_client import client_for
from fl_app.data.sources import data_source, load_partition
from fl_app.data.types import DataError, DataSettings
from fl_app.ml.standardize import Standardization, from_moments, moments
from fl_app.ml.trainer import TrainSettings, trainer_for
from fl_app.schema import ConfigError
from fl_app.server.statistics import STATISTICS_CONFIG, StatisticsRound, outliers
from fl_app.wire import KEY_CLIPPING_NORM, KEY_DP_NOISE_STD, KEY_STANDARDIZATION
from tests.conftest import make_config

MODEL = "examples.keras_models:regression"  # the seed's adam/mse model
CLIENTS = 5


@pytest.fixture
def diabetes_csv(tmp_path) -> str:
    """The seed case: diabetes with its raw target (25..346) in a CSV."""
    path = tmp_path / "diabetes.csv"
    load_diabetes(as_frame=True).frame.to_csv(path, index=False)
    return str(path)


def seed_config(data: str, **overrides):
    return make_config(**{"dataset": data, "label_column": "target", "task": "regression",
                          "model": MODEL, "standardize": True, **overrides})


def pooled_statistics(cfg) -> Standardization:
    """What the server pools from the real clients' answers to the statistics round."""
    statistics = StatisticsRound(data_source(DataSettings.from_config(cfg)).spec)
    replies = []
    for pid in range(CLIENTS):
        client = client_for(cfg, {"partition-id": pid, "num-partitions": CLIENTS})
        sums, _, metrics = client.fit([], dict(STATISTICS_CONFIG))
        assert not {k for k in metrics if not k.startswith("time_")}  # nothing but the sums
        replies.append((str(pid), sums))
    statistics.add(replies)
    return statistics.standardization


def test_a_client_sends_its_sums_only_to_a_standardizing_plaintext_run(diabetes_csv):
    """A deviating server cannot get a client's raw data sums from a run that did not turn
    `standardize` on, nor from a client-side DP round (the sums would skip the clipping
    and the noise)."""
    partition = {"partition-id": 0, "num-partitions": CLIENTS}
    client = client_for(seed_config(diabetes_csv, standardize=False), partition)
    with pytest.raises(ValueError, match="standardize=false: refused"):
        client.fit([], dict(STATISTICS_CONFIG))
    client = client_for(seed_config(diabetes_csv), partition)
    with pytest.raises(ValueError, match="client-side DP round: refused"):
        client.fit([], {**STATISTICS_CONFIG, KEY_CLIPPING_NORM: 0.1, KEY_DP_NOISE_STD: 1.0})


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_pooled_sums_give_the_central_mean_and_variance(diabetes_csv, partitioner):
    cfg = seed_config(diabetes_csv, partitioner=partitioner)
    pooled = pooled_statistics(cfg)
    settings = DataSettings.from_config(cfg)
    parts = [load_partition(settings, pid, CLIENTS).train for pid in range(CLIENTS)]
    x = np.concatenate([p.x for p in parts]).astype(np.float64)
    y = np.concatenate([p.y for p in parts]).astype(np.float64)
    np.testing.assert_allclose(pooled.x_mean, x.mean(axis=0), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(pooled.x_variance, x.var(axis=0), rtol=1e-6)
    np.testing.assert_allclose(pooled.y_mean, [y.mean()], rtol=1e-6)
    np.testing.assert_allclose(pooled.y_std, [y.std()], rtol=1e-6)
    assert 100 < pooled.y_mean[0] < 200  # the raw target's scale, not a standardized one


def test_classes_send_no_target_and_images_pool_per_channel():
    x = np.random.default_rng(0).normal(3.0, 2.0, size=(40, 4, 4, 3))
    sums = [a + b for a, b in zip(moments(x[:15], None), moments(x[15:], None))]
    pooled = from_moments(sums)
    assert pooled.y_mean is None and pooled.x_mean.shape == (3,)
    np.testing.assert_allclose(pooled.x_variance, x.reshape(-1, 3).var(axis=0), rtol=1e-9)


def _honest(clients: int = 4, seed: int = 1) -> list[list[np.ndarray]]:
    """Sums of `clients` plausible clients' data (10 features, a target about 100)."""
    rng = np.random.default_rng(seed)
    return [moments(rng.normal(0.0, 1.0, (50, 10)), rng.normal(100.0, 10.0, 50))
            for _ in range(clients)]


def test_a_reply_not_of_the_clients_form_is_dropped(diabetes_csv):
    settings = DataSettings.from_config(seed_config(diabetes_csv))
    statistics = StatisticsRound(data_source(settings).spec)
    good = moments(np.ones((4, 10)), np.arange(4.0))
    statistics.add([("a", good), ("a2", good), ("a3", good),
                    ("b", [np.full_like(a, np.nan) for a in good]), ("c", good[:3])])
    assert statistics.standardization.y_mean[0] == pytest.approx(1.5)
    with pytest.raises(DataError, match="0 client\\(s\\) answered"):
        statistics.add([("b", good[:3])])


def test_a_lying_client_cannot_set_the_standardization(diabetes_csv):
    """Sums no data can have are dropped (negative or too small sums of squares, a count of
    values that is not the rows', a fractional row); a huge claimed count of plausible data
    is capped at the examples cap like a fit claim, keeping the liar's means but not its
    weight."""
    spec = data_source(DataSettings.from_config(seed_config(diabetes_csv))).spec
    honest = _honest()
    statistics = StatisticsRound(spec, examples_cap_factor=3.0)
    bad_squares = [a.copy() for a in honest[0]]
    bad_squares[2][:] = -1.0
    bad_count = [a.copy() for a in honest[0]]
    bad_count[0][0] += 1
    shifted = np.random.default_rng(2)  # within the others' spread, 10^10 times the rows
    liar = [a * 1e10 for a in moments(shifted.normal(1.0, 1.0, (50, 10)),
                                      shifted.normal(110.0, 10.0, 50))]
    liar_mean = liar[3][0] / liar[0][1]
    statistics.add([*[(str(i), sums) for i, sums in enumerate(honest)],
                    ("squares", bad_squares), ("count", bad_count), ("liar", liar)])
    honest_only = from_moments([np.sum(a, axis=0) for a in zip(*honest)])
    pooled = statistics.standardization
    # the liar's rows are capped at 3 x the median claim: 150 of the pool's 350
    assert pooled.y_mean[0] == pytest.approx((200 * honest_only.y_mean[0] + 150 * liar_mean)
                                             / 350)
    unlimited = StatisticsRound(spec)
    unlimited.add([*[(str(i), sums) for i, sums in enumerate(honest)], ("liar", liar)])
    assert unlimited.standardization.y_mean[0] == pytest.approx(liar_mean)  # without the cap


@pytest.mark.parametrize("lie", ["mean", "spread", "target"])
def test_a_client_with_huge_values_within_the_row_cap_is_dropped(diabetes_csv, caplog, lie):
    """A liar claiming as many rows as the others but huge values (a feature's mean, its
    spread, the target's mean) cannot move the pooled statistics: its means and spreads lie
    far outside the other clients', so it is dropped and logged by its id; the honest
    clients' pool is what remains, in float64."""
    spec = data_source(DataSettings.from_config(seed_config(diabetes_csv))).spec
    honest = _honest()
    x, y = np.random.default_rng(3).normal(0.0, 1.0, (50, 10)), np.full(50, 100.0)
    if lie == "mean":
        x[:, 4] += 1e6
    elif lie == "spread":
        x[:, 4] *= 1e6
    else:
        y = y * 1e6
    statistics = StatisticsRound(spec, examples_cap_factor=3.0)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        statistics.add([*[(str(i), sums) for i, sums in enumerate(honest)],
                        ("liar", moments(x, y))])
    assert "client liar: its statistics' means or spreads lie more than" in caplog.text
    honest_only = from_moments([np.sum(a, axis=0) for a in zip(*honest)])
    for got, want in zip(vars(statistics.standardization).values(), vars(honest_only).values()):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("partitioner, clients", [("pathological", 10),
                                                  ("dirichlet", 30), ("pathological", 100)])
def test_label_skewed_honest_clients_are_not_outliers(partitioner, clients):
    """Real clients of digits split by label (2 classes each, or Dirichlet(0.1)): their
    pixels' means and spreads differ widely, and none is taken for a liar."""
    cfg = make_config(partitioner=partitioner, dirichlet_alpha=0.1)
    settings = DataSettings.from_config(cfg)
    sums = {str(pid): moments(load_partition(settings, pid, clients).train.x, None)
            for pid in range(clients)}
    assert outliers(sums) == []


def test_fewer_than_three_or_min_fit_clients_replies_stop_the_run(diabetes_csv, tmp_path):
    """One or two kept replies would make the pooled statistics those clients' own: the run
    stops before training (the statistics round raises DataError, an `error:` line; a
    simulation with too few clients is refused before it starts)."""
    spec = data_source(DataSettings.from_config(seed_config(diabetes_csv))).spec
    honest = [(str(i), sums) for i, sums in enumerate(_honest())]
    for replies, min_fit in ((honest[:2], 2), (honest[:3], 4)):
        with pytest.raises(DataError, match=f"{len(replies)} client\\(s\\) answered the "
                                            f"statistics round with usable sums, fewer "
                                            f"than {max(min_fit, 3)}"):
            StatisticsRound(spec, min_replies=min_fit).add(replies)
    StatisticsRound(spec, min_replies=2).add(honest[:3])  # three are enough
    with pytest.raises(ConfigError, match="'standardize' is true with 2 clients"):
        check_num_clients(seed_config(diabetes_csv, min_fit_clients=2,
                                      min_available_clients=2), 2)
    check_num_clients(seed_config(diabetes_csv), 3)


@pytest.mark.parametrize("conflict", [{"secure_aggregation": "secagg+"},
                                      {"homomorphic_encryption": "ckks"},
                                      {"strategy": "dp-fixed"}, {"server_loop": "fedbuff"}])
def test_standardize_is_refused_where_the_sums_would_leak_or_go_unaccounted(conflict):
    key = next(iter(conflict)).replace("_", "-")
    with pytest.raises(ConfigError, match=f"'standardize' is true with {key}="):
        make_config(standardize=True, **conflict)


def test_evaluation_with_standardization_is_the_wrapped_models_on_raw_data(diabetes_csv):
    cfg = seed_config(diabetes_csv)
    train = TrainSettings.from_config(cfg)
    trainer = trainer_for(train, data_source(DataSettings.from_config(cfg)).spec)
    standardization = pooled_statistics(cfg)
    test = data_source(DataSettings.from_config(cfg)).test_set()
    loss, metrics = trainer.evaluate(test, standardization)
    wrapped = standardization.wrap(trainer.model, trainer.spec.input_shape)
    logs = wrapped.evaluate(test.x, test.y, verbose=0, return_dict=True)
    assert loss == pytest.approx(logs["loss"], rel=1e-5)
    assert metrics["mae"] == pytest.approx(logs["mae"], rel=1e-5)
    assert trainer.evaluate(test)[0] != pytest.approx(loss, rel=1e-3)  # the layers matter


def _run(tmp_path, data: str, standardize: bool) -> tuple[dict, keras.Model]:
    out = tmp_path / f"standardize-{standardize}"
    code = run_simulation.main(["--num-supernodes", "4", "--out", str(out), "--run-config",
                                f"dataset='{data}' label-column='target' task='regression' "
                                f"model='{MODEL}' num-server-rounds=3 "
                                f"standardize={str(standardize).lower()}"])
    assert code == 0
    history = json.loads((out / "history.json").read_text())
    return history, keras.models.load_model(out / "final_model.keras")


@pytest.mark.slow
def test_a_standardized_run_beats_the_raw_one_and_saves_a_raw_input_model(tmp_path,
                                                                         diabetes_csv):
    raw_history, raw_model = _run(tmp_path, diabetes_csv, standardize=False)
    history, model = _run(tmp_path, diabetes_csv, standardize=True)
    final = history["rounds"][-1]["centralized"]["loss"]
    assert final < 0.25 * raw_history["rounds"][-1]["centralized"]["loss"]
    layers = [type(layer).__name__ for layer in model.layers]
    assert layers[1] == "Normalization" and layers[-1] == "Rescaling"
    assert "Normalization" not in [type(layer).__name__ for layer in raw_model.layers]
    settings = DataSettings.from_config(seed_config(diabetes_csv))
    test = data_source(settings).test_set()  # raw features and target
    logs = model.evaluate(test.x, test.y, verbose=0, return_dict=True)
    assert logs["loss"] == pytest.approx(final, rel=1e-4)
    assert 25 < float(np.median(model.predict(test.x, verbose=0))) < 346
    assert "standardization" not in json.dumps(history["rounds"])  # no client's sums recorded


def test_a_standardized_run_is_not_resumed_under_other_statistics(tmp_path):
    with pytest.raises(ConfigError, match="'standardize' is true with resume-from"):
        make_config(standardize=True, resume_from=str(tmp_path))


def test_a_constant_column_is_centred_not_blown_up():
    """E[x²] - E[x]² of a constant is float64 rounding, not 0: it still gets variance 1."""
    x = np.column_stack([np.full(97, 0.1), np.arange(97.0)])
    pooled = from_moments(moments(x, np.full(97, 123.456)))
    assert pooled.x_variance[0] == 1.0 and pooled.y_std[0] == 1.0
    assert pooled.x_variance[1] == pytest.approx(np.var(np.arange(97.0)))


def test_a_reply_of_strings_or_bad_bytes_is_dropped_not_a_crash(diabetes_csv):
    from flwr.common import Parameters

    from fl_app.server.runner import _decoded_or_none

    settings = DataSettings.from_config(seed_config(diabetes_csv))
    statistics = StatisticsRound(data_source(settings).spec)
    good = moments(np.ones((4, 10)), np.arange(4.0))
    strings = [np.full(a.shape, "x") for a in good]
    bad = _decoded_or_none(Parameters(tensors=[b"not npy"], tensor_type="numpy.ndarray"))
    statistics.add([("a", good), ("a2", good), ("a3", good), ("strings", strings),
                    ("bytes", bad)])
    assert statistics.standardization.y_mean[0] == pytest.approx(1.5)


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _allocation_bomb() -> bytes:
    """An .npz whose every header claims 10^9 float64 values (8 GB) but holds none."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (10 ** 9,)})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in ("x_mean", "x_variance", "y_mean", "y_std"):
            archive.writestr(f"{name}.npy", header.getvalue())
    return buffer.getvalue()


def test_a_client_refuses_standardization_bytes_not_of_its_own_data(diabetes_csv):
    """A deviating server's statistics are checked before use: the byte length, the arrays'
    names, dtypes and shapes (the client's 10 features, 1 target) from their headers before
    any data is read, finite values and positive variances; the message fails with an error
    naming the problem, the client answers the next one."""
    cfg = seed_config(diabetes_csv)
    client = client_for(cfg, {"partition-id": 0, "num-partitions": CLIENTS})
    train = TrainSettings.from_config(cfg)
    weights = trainer_for(train, data_source(DataSettings.from_config(cfg)).spec).get_weights()
    good = {"x_mean": np.zeros(10), "x_variance": np.ones(10), "y_mean": np.zeros(1),
            "y_std": np.ones(1)}
    bad = {
        "more than the": _npz(**good, padding=np.zeros(10 ** 6)),
        "arrays": _npz(**good, evil=np.zeros(1)),
        "expected float64 of shape \\(10,\\)": _npz(**{**good, "x_mean": np.zeros(3)}),
        "float32": _npz(**{**good, "y_std": np.ones(1, np.float32)}),
        "of shape \\(1000000000,\\)": _allocation_bomb(),
        "not an .npz": b"\x93NUMPY" + bytes(100),
        "not finite": _npz(**{**good, "x_mean": np.full(10, np.nan)}),
        "not > 0": _npz(**{**good, "x_variance": np.zeros(10)}),
    }
    for problem, data in bad.items():
        with pytest.raises(ValueError, match=f"standardization: .*{problem}"):
            client.evaluate(weights, {KEY_STANDARDIZATION: data})
    loss, count, _ = client.evaluate(weights, {KEY_STANDARDIZATION: _npz(**good)})
    assert np.isfinite(loss) and count > 0
