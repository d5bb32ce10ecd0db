"""One decode, one pass: zero-copy decoding of Flower's tensors, the running weighted sum, and
ValidatedStrategy folding a weighted average's updates as it checks them."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.strategy.aggregate import aggregate

from strategies import ValidatedStrategy, WeightedFedAvg, decoding
from strategies.decoding import decode, decode_tensor, encode
from strategies.running_sum import RunningWeightedSum
from strategies.validation import is_finite
from tests.flower_objects import random_model, results


def test_decode_equals_flowers_and_copies_nothing():
    arrays = [np.arange(12, dtype=np.float32).reshape(3, 4),
              np.asfortranarray(np.arange(6.0).reshape(2, 3)), np.array(7, dtype=np.int64),
              np.zeros((0, 3), np.float32)]
    parameters = ndarrays_to_parameters(arrays)
    ours, flowers = decode(parameters), parameters_to_ndarrays(parameters)
    for got, want, tensor in zip(ours, flowers, parameters.tensors):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert not got.flags.writeable  # a view of the bytes Flower received
        assert got.size == 0 or np.shares_memory(got, np.frombuffer(tensor, np.uint8))


def test_encode_writes_flowers_bytes():
    arrays = [np.arange(12, dtype=np.float32).reshape(3, 4), np.ones(()),
              np.zeros((0, 3), np.int32), np.asfortranarray(np.ones((2, 3))),
              np.arange(5, dtype=">f4")]
    assert encode(arrays) == ndarrays_to_parameters(arrays)


@pytest.mark.parametrize("tensor", [b"", b"not an npy array at all",
                                    ndarrays_to_parameters([np.ones(10)]).tensors[0][:-8]])
def test_decode_refuses_what_np_load_refuses(tensor):
    with pytest.raises(ValueError):
        decode_tensor(tensor)


def test_other_tensor_types_go_through_flower():
    arrays = [np.ones(3, np.float32)]
    parameters = Parameters(tensors=ndarrays_to_parameters(arrays).tensors, tensor_type="x")
    np.testing.assert_array_equal(decode(parameters)[0], arrays[0])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_is_finite_matches_numpy(bad):
    array = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    assert is_finite(array)
    array[500] = bad
    huge = np.full(10, 3e38, dtype=np.float32)  # finite, but its sum of squares overflows
    with np.errstate(over="ignore", invalid="ignore"):
        assert is_finite(huge) and not is_finite(array)


@pytest.mark.parametrize("seed", range(3))
def test_running_sum_equals_flowers_aggregate(seed):
    rng = np.random.default_rng(seed)
    updates = [(random_model(rng), int(rng.integers(1, 500))) for _ in range(6)]
    total = RunningWeightedSum(random_model(rng))
    for arrays, n in updates:
        assert total.add(arrays, n) is None
    for ours, flowers in zip(total.result(), aggregate(updates)):
        np.testing.assert_allclose(ours, flowers, atol=1e-6, rtol=0)
        assert ours.dtype == np.float32
    assert total.count == 6 and total.total_weight == sum(n for _, n in updates)


def test_float64_arrays_are_summed_in_float64():
    reference = [np.zeros(3), np.zeros(2, np.int32)]
    total = RunningWeightedSum(reference)
    total.add([np.array([1.0, 2.0, 1e-17]), np.array([1, 2], np.int32)], 1)
    total.add([np.array([3.0, 4.0, 1.0]), np.array([3, 5], np.int32)], 3)
    mean, counts = total.result()
    np.testing.assert_array_equal(mean, [2.5, 3.5, (1e-17 + 3.0) / 4])
    assert counts.dtype == np.int32 and counts.tolist() == [2, 4]


def _bad_kinds(good: list[np.ndarray]) -> dict[str, list[np.ndarray]]:
    nan = [a.copy() for a in good]
    nan[2][-1, -1] = np.nan
    inf = [a.copy() for a in good]
    inf[1][0] = np.inf
    return {"nan-in-last-array": nan, "inf": inf, "wrong-shape": [good[0][:2], *good[1:]],
            "missing-array": good[:2], "wrong-dtype": [a.astype(np.float64) for a in good]}


@pytest.mark.parametrize("kind", list(_bad_kinds(random_model(np.random.default_rng(0)))))
def test_a_rejected_update_leaves_the_sum_exactly_as_it_was(kind):
    rng = np.random.default_rng(1)
    reference = random_model(rng)
    good = [(random_model(rng), int(rng.integers(1, 100))) for _ in range(4)]
    bad = _bad_kinds(random_model(rng))[kind]
    with_bad, without = RunningWeightedSum(reference), RunningWeightedSum(reference)
    for i, (arrays, n) in enumerate(good):
        if i == 2:
            assert with_bad.add(bad, 50) is not None
        assert with_bad.add(arrays, n) is None
        without.add(arrays, n)
    assert with_bad.count == without.count and with_bad.total_weight == without.total_weight
    for a, b in zip(with_bad.result(), without.result()):
        assert np.array_equal(a, b)  # bit for bit


def test_a_weight_must_be_positive():
    total = RunningWeightedSum(random_model(np.random.default_rng(2)))
    with pytest.raises(ValueError, match="positive"):
        total.add(random_model(np.random.default_rng(3)), 0)


def _validated(global_model, **kwargs) -> ValidatedStrategy:
    inner = WeightedFedAvg(initial_parameters=ndarrays_to_parameters(global_model))
    strategy = ValidatedStrategy(inner, min_fit_clients=1, **kwargs)
    strategy.initialize_parameters(SimpleClientManager())
    return strategy


@pytest.mark.parametrize("kind", list(_bad_kinds(random_model(np.random.default_rng(0)))))
def test_validated_average_with_a_bad_update_in_the_middle_equals_it_without(kind):
    rng = np.random.default_rng(4)
    global_model = random_model(rng)
    good = [(random_model(rng), n) for n in (30, 40, 50, 60)]
    bad = (_bad_kinds(random_model(rng))[kind], 45)
    with_bad, metrics = _validated(global_model).aggregate_fit(
        1, results([*good[:2], bad, *good[2:]]), [])
    without, _ = _validated(global_model).aggregate_fit(1, results(good), [])
    assert metrics["num_rejected"] == 1
    for a, b in zip(parameters_to_ndarrays(with_bad), parameters_to_ndarrays(without)):
        assert np.array_equal(a, b)


def test_a_rejection_that_moves_the_examples_cap_refolds_with_the_rounds_cap():
    rng = np.random.default_rng(5)
    global_model = random_model(rng)
    good = [(random_model(rng), n) for n in (1, 5, 5)]
    nan = [a.copy() for a in global_model]
    nan[0][0, 0] = np.nan
    # Before the NaN update is read the claims are 1, 5, 5, 1: cap 3 x 1. Without it the
    # round's lower median claim is 5: no claim is capped.
    params, metrics = _validated(global_model, examples_cap_factor=3.0).aggregate_fit(
        1, results([*good, (nan, 1)]), [])
    for ours, flowers in zip(parameters_to_ndarrays(params), aggregate(good)):
        np.testing.assert_allclose(ours, flowers, atol=1e-6, rtol=0)
    assert metrics == {**metrics, "num_rejected": 1, "num_capped": 0}


def test_each_update_is_decoded_once_and_never_copied(monkeypatch):
    calls = []
    monkeypatch.setattr(decoding, "decode_tensor",
                        lambda tensor: calls.append(tensor) or decode_tensor(tensor))
    monkeypatch.setattr(decoding, "parameters_to_ndarrays", None)  # would copy: never called
    rng = np.random.default_rng(6)
    global_model = random_model(rng)
    updates = [(random_model(rng), n) for n in (10, 20, 30)]
    params, _ = _validated(global_model, outlier_norm_factor=3.0).aggregate_fit(
        1, results(updates), [])
    assert len(calls) == 3 * (1 + len(updates))  # the global model once, each update once
    for ours, flowers in zip(parameters_to_ndarrays(params), aggregate(updates)):
        np.testing.assert_allclose(ours, flowers, atol=1e-6, rtol=0)
