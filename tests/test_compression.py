"""Update compression end to end on real Flower objects: the registry's strategy stacks
(weighted-fedavg, Flower's FedMedian, client-side DP) behind `CompressedStrategy`, clients
behind `CompressingClient`, the bytes counted, and error feedback in a real simulation."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from flwr.client import NumPyClient
from flwr.common import (
    FitIns,
    FitRes,
    Parameters,
    RecordDict,
    ndarray_to_bytes,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from fl_app.client.compression import (
    RESIDUAL_IN,
    RESIDUAL_KEY,
    RESIDUAL_OUT,
    CompressingClient,
)
from fl_app.codecs import TopKCodec, codec_of
from fl_app.protocol.clipping import clip_weights, l2_norm, model_update
from fl_app.schema import ConfigError
from fl_app.wire import KEY_CLIPPING_NORM, KEY_COMPRESS_UP, KEY_ERROR_FEEDBACK
from strategies.compose import compose
from strategies.compression import CompressedStrategy
from strategies.context import StrategyContext
from strategies.validated import ValidatedStrategy
from strategies.wire_meter import WireMeter, parameters_bytes
from tests.conftest import make_config
from tests.dp_rounds import client_manager

SHAPES = ((20, 10), (10,))
NUM_CLIENTS = 4


def random_arrays(seed: int, scale: float = 1.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=s) * scale).astype(np.float32) for s in SHAPES]


class ShiftClient(NumPyClient):
    """Returns the weights it received plus a fixed update; clips the update to the round's
    clip norm first, as KerasClient does under client-side DP."""

    def __init__(self, delta: list[np.ndarray], num_examples: int = 10) -> None:
        self.delta = delta
        self.num_examples = num_examples

    def get_parameters(self, config):
        return [np.zeros(s, np.float32) for s in SHAPES]

    def fit(self, parameters, config):
        weights = [(p + d).astype(np.float32) for p, d in zip(parameters, self.delta)]
        metrics = {}
        if KEY_CLIPPING_NORM in config:
            weights, metrics["norm_bit"] = clip_weights(weights, parameters,
                                                        float(config[KEY_CLIPPING_NORM]))
        return weights, self.num_examples, metrics


def stack(**config):
    """The strategy the registry builds for `config`, on a random initial model."""
    cfg = make_config(min_fit_clients=2, min_available_clients=2, **config)
    initial = ndarrays_to_parameters(random_arrays(99))
    return compose(StrategyContext(cfg=cfg, initial_parameters=initial), meter=False), initial


def play(strategy, parameters: Parameters, deltas: dict[str, list[np.ndarray]],
         states: dict[str, RecordDict] | None = None, server_round: int = 1):
    """One round: configure_fit, each sampled client answers through CompressingClient,
    aggregate_fit. Returns (new weights, metrics, instructions, results)."""
    manager = client_manager(NUM_CLIENTS)
    instructions = strategy.configure_fit(server_round, parameters, manager)
    states = states if states is not None else {}
    results = []
    for proxy, ins in instructions:
        client = CompressingClient(ShiftClient(deltas[proxy.cid]).to_client(),
                                   states.setdefault(proxy.cid, RecordDict()))
        results.append((proxy, client.fit(ins)))
    new, metrics = strategy.aggregate_fit(server_round, results, [])
    return (None if new is None else parameters_to_ndarrays(new)), metrics, instructions, results


def decoded_weights(res: FitRes, reference: list[np.ndarray]) -> list[np.ndarray]:
    """What the server must decode a compressed result to: reference + decoded update."""
    codec = codec_of(res.parameters.tensor_type)
    update = codec.decode(list(res.parameters.tensors), reference)
    return [(r.astype(np.float64) + u).astype(np.float32) for r, u in zip(reference, update)]


DELTAS = {f"c{i}": random_arrays(i, scale=0.1) for i in range(NUM_CLIENTS)}


def test_the_registry_puts_compression_outermost_and_only_when_asked():
    strategy, _ = stack(compress_up="int8")
    assert isinstance(strategy, CompressedStrategy)
    assert isinstance(strategy.inner, ValidatedStrategy)
    plain, _ = stack()
    assert isinstance(plain, ValidatedStrategy)
    with pytest.raises(ConfigError, match="error-feedback"):
        make_config(error_feedback=True)


@pytest.mark.parametrize("name", ["weighted-fedavg", "fedmedian"])
@pytest.mark.parametrize("up", ["fp16", "int8", "int8-channel", "top-k"])
def test_the_inner_strategy_aggregates_the_decoded_weights(name, up):
    """WeightedFedAvg (ours) and FedMedian (Flower's) receive exactly reference + decoded
    update of every client: their aggregate is the mean / median of those."""
    strategy, initial = stack(strategy=name, compress_up=up, compress_top_k=0.1)
    new, metrics, instructions, results = play(strategy, initial, DELTAS)
    reference = parameters_to_ndarrays(initial)
    assert all(ins.config[KEY_COMPRESS_UP] == up for _, ins in instructions)
    assert all(codec_of(res.parameters.tensor_type).name == up for _, res in results)
    clients = [decoded_weights(res, reference) for _, res in results]
    combine = np.mean if name == "weighted-fedavg" else np.median
    for i, layer in enumerate(new):
        np.testing.assert_allclose(layer, combine([c[i] for c in clients], axis=0), atol=1e-6)
    assert metrics["num_rejected"] == 0
    uncompressed = sum(len(ndarray_to_bytes(a)) for a in reference)
    assert all(parameters_bytes(res.parameters) < uncompressed / 1.9 for _, res in results)


def test_a_compressed_update_that_does_not_decode_is_rejected_and_counted(caplog):
    strategy, initial = stack(compress_up="int8")
    manager = client_manager(NUM_CLIENTS)
    instructions = strategy.configure_fit(1, initial, manager)
    results = [(proxy, CompressingClient(ShiftClient(DELTAS[proxy.cid]).to_client(),
                                         RecordDict()).fit(ins)) for proxy, ins in instructions]
    bad_proxy, bad = results[0]
    results[0] = (bad_proxy, FitRes(bad.status, Parameters(bad.parameters.tensors[:1],
                                                           bad.parameters.tensor_type),
                                    bad.num_examples, bad.metrics))
    with caplog.at_level(logging.WARNING):
        new, metrics = strategy.aggregate_fit(1, results, [])
    assert metrics["num_rejected"] == 1
    assert f"rejected update from client {bad_proxy.cid}" in caplog.text
    reference = parameters_to_ndarrays(initial)
    good = [decoded_weights(res, reference) for _, res in results[1:]]
    np.testing.assert_allclose(parameters_to_ndarrays(new)[0],
                               np.mean([g[0] for g in good], axis=0), atol=1e-6)
    assert results[1][1].parameters.tensor_type.startswith("fl-codec/")  # left as sent


def test_the_broadcast_is_encoded_and_the_inner_strategy_sees_what_clients_decode():
    """compress-down=int8: the FitIns carry int8 blobs (about a quarter of float32's bytes);
    a client that returns what it received yields the decoded broadcast w̃ (up to the float32
    rounding of the average, summed in float32 as Flower's), within half a quantization step
    of the server's model."""
    strategy, initial = stack(compress_down="int8")
    zero = {cid: [np.zeros(s, np.float32) for s in SHAPES] for cid in DELTAS}
    new, _, instructions, results = play(strategy, initial, zero)
    reference = parameters_to_ndarrays(initial)
    for _, ins in instructions:
        assert ins.parameters.tensor_type == "fl-codec/int8-channel"
        assert parameters_bytes(ins.parameters) < parameters_bytes(initial) / 3.5
    received = codec_of(instructions[0][1].parameters.tensor_type).decode(
        list(instructions[0][1].parameters.tensors), reference)
    for w, r, got in zip(received, reference, new):
        np.testing.assert_allclose(got, w, rtol=1e-6, atol=0)
        assert np.max(np.abs(w - r)) <= np.max(np.abs(r)) / 127 / 2 * 1.001
    assert all(res.parameters.tensor_type == "numpy.ndarray" for _, res in results)


@pytest.mark.parametrize("up", ["fp16", "int8", "top-k"])
def test_client_side_dp_clips_before_encoding_and_noises_after_decoding(up, caplog):
    """dp-client-fixed: each client clips its update to C and only then encodes it (the
    decoded update is within C plus the codec's stated overshoot); the server brings a
    codec overshoot back to C without DP's "above the clip norm" warning, and DP adds its
    noise to the average of the decoded updates."""
    clip = 0.5
    big = {cid: [d * 20 for d in delta] for cid, delta in DELTAS.items()}  # norms >> C
    common = dict(strategy="dp-client-fixed", compress_up=up, clipping_norm=clip,
                  dp_noise_seed=7, compress_top_k=0.2)
    strategy, initial = stack(noise_multiplier=0.0, **common)
    reference = parameters_to_ndarrays(initial)
    with caplog.at_level(logging.WARNING):
        new, metrics, instructions, results = play(strategy, initial, big)
    assert all(ins.config[KEY_CLIPPING_NORM] == clip for _, ins in instructions)
    updates = []
    for _, res in results:
        codec = codec_of(res.parameters.tensor_type)
        update = codec.decode(list(res.parameters.tensors), reference)
        assert l2_norm(update) <= clip + codec.overshoot(list(res.parameters.tensors),
                                                         reference) + 1e-6
        assert res.metrics["norm_bit"] is True
        updates.append(update)
    assert "above the clip norm" not in caplog.text
    released = model_update(new, reference)
    assert l2_norm(released) <= clip * (1 + 1e-5)  # the mean of updates within C
    scale = [min(1.0, clip / l2_norm(u)) for u in updates]
    expected = [np.mean([u[i] * s for u, s in zip(updates, scale)], axis=0)
                for i in range(len(SHAPES))]
    for got, want in zip(released, expected):
        np.testing.assert_allclose(got, want, atol=1e-5)

    noisy, _ = stack(noise_multiplier=1.0, **common)
    new, metrics, _, results = play(noisy, initial, big)
    noise = np.concatenate([(n - r).ravel() for n, r in zip(new, reference)]) - np.concatenate(
        [(np.mean([u[i] * min(1.0, clip / l2_norm(u)) for u in
                   [codec_of(res.parameters.tensor_type).decode(list(res.parameters.tensors),
                                                                reference)
                    for _, res in results]], axis=0)).ravel() for i in range(len(SHAPES))])
    assert metrics["dp_noise_std"] == pytest.approx(clip / NUM_CLIENTS)
    assert np.std(noise) == pytest.approx(metrics["dp_noise_std"], rel=0.25)


def test_error_feedback_keeps_the_residual_in_the_nodes_state():
    """Top-k with error feedback, five rounds of the same update: the residual lives in the
    RecordDict given as context.state, and what was sent plus what is left is exactly
    what was meant to be sent (nothing is lost, only delayed)."""
    delta = random_arrays(5, scale=0.1)
    state = RecordDict()
    client = CompressingClient(ShiftClient(delta).to_client(), state)
    zeros = [np.zeros(s, np.float32) for s in SHAPES]
    config = {KEY_COMPRESS_UP: "top-k", "compress-top-k": 0.05, KEY_ERROR_FEEDBACK: True}
    sent = [np.zeros(s) for s in SHAPES]
    previous_out = 0.0
    for _ in range(5):
        res = client.fit(FitIns(ndarrays_to_parameters(zeros), config))
        assert res.metrics[RESIDUAL_IN] == pytest.approx(previous_out)
        previous_out = res.metrics[RESIDUAL_OUT]
        for total, part in zip(sent, TopKCodec().decode(list(res.parameters.tensors), zeros)):
            total += part
    residual = state.array_records[RESIDUAL_KEY].to_numpy_ndarrays()
    for total, left, d in zip(sent, residual, delta):
        np.testing.assert_allclose(total + left, 5 * d.astype(np.float64), atol=1e-5)
    assert previous_out > 0
    # Without error feedback nothing is kept.
    fresh = RecordDict()
    CompressingClient(ShiftClient(delta).to_client(), fresh).fit(
        FitIns(ndarrays_to_parameters(zeros), {**config, KEY_ERROR_FEEDBACK: False}))
    assert RESIDUAL_KEY not in fresh.array_records


def test_error_feedback_under_client_dp_sends_at_most_the_clip_norm():
    delta = random_arrays(6, scale=1.0)
    client = CompressingClient(ShiftClient(delta).to_client(), RecordDict())
    zeros = [np.zeros(s, np.float32) for s in SHAPES]
    config = {KEY_COMPRESS_UP: "top-k", "compress-top-k": 0.3, KEY_ERROR_FEEDBACK: True,
              KEY_CLIPPING_NORM: 1.0}
    for _ in range(3):
        res = client.fit(FitIns(ndarrays_to_parameters(zeros), config))
        assert l2_norm(TopKCodec().decode(list(res.parameters.tensors), zeros)) <= 1 + 1e-6


def test_the_meter_counts_the_parameter_bytes_of_every_message():
    strategy, initial = stack(compress_up="int8")
    meter = WireMeter(strategy)
    manager = client_manager(NUM_CLIENTS)
    instructions = meter.configure_fit(1, initial, manager)
    results = [(proxy, CompressingClient(ShiftClient(DELTAS[proxy.cid]).to_client(),
                                         RecordDict()).fit(ins)) for proxy, ins in instructions]
    meter.aggregate_fit(1, results, [])
    float32 = sum(len(t) for t in initial.tensors)
    int8 = sum(s[0] * s[1] if len(s) == 2 else s[0] for s in SHAPES) + 4 * len(SHAPES)
    assert meter.take() == {"up": NUM_CLIENTS * int8, "down": NUM_CLIENTS * float32}
    assert meter.take() == {"up": 0, "down": 0}


@pytest.mark.slow
def test_error_feedback_carries_the_residual_across_rounds_in_a_simulation(tmp_path):
    """Flower's simulation engine, 2 clients, 3 rounds, top-k 1% with error feedback: each
    round's residual carried in is the one kept the round before (so it survived in
    context.state between messages), and history.json counts the bytes of the messages."""
    from fl_app.cli import simulate

    code = simulate.main(["--num-supernodes", "2", "--out", str(tmp_path), "--run-config",
                          "num-server-rounds=3 local-epochs=1 fraction-evaluate=0 "
                          "min-fit-clients=2 min-available-clients=2 compress-up='top-k' "
                          "compress-top-k=0.01 error-feedback=true"])
    assert code == 0
    history = json.loads((tmp_path / "history.json").read_text(encoding="utf-8"))
    rounds = [r for r in history["rounds"] if r["round"] > 0]
    assert rounds[0]["fit"][RESIDUAL_IN] == 0
    for before, after in zip(rounds, rounds[1:]):
        assert after["fit"][RESIDUAL_IN] > 0
        assert after["fit"][RESIDUAL_IN] == pytest.approx(before["fit"][RESIDUAL_OUT],
                                                           rel=1e-6)
    from keras import models

    weights = models.load_model(tmp_path / "final_model.keras").get_weights()
    size = sum(w.size for w in weights)
    kept = int(np.ceil(0.01 * size))
    float32 = sum(len(ndarray_to_bytes(w)) for w in weights)
    for record in rounds:
        assert record["bytes"] == {"up": 2 * 8 * kept, "down": 2 * float32}
    assert (tmp_path / "bytes.png").is_file()


def test_the_summary_and_the_plots_show_the_bytes(tmp_path):
    from fl_app.cli.summary import summary_columns
    from fl_app.server.outputs import save_plots

    rounds = [{"round": 0, "seconds": 0.0, "centralized": {"accuracy": 0.1}},
              {"round": 1, "seconds": 1.0, "bytes": {"up": 1200, "down": 4800},
               "centralized": {"accuracy": 0.5}}]
    cells = {name: [cell(r) for r in rounds] for name, cell in summary_columns(rounds)}
    assert cells["bytes up"] == ["", "1200"] and cells["bytes down"] == ["", "4800"]
    assert tmp_path / "bytes.png" in save_plots(tmp_path, rounds)
