"""Checkpoints: format round trip, clear errors, and strategy/server state that resumes exactly."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

import run_simulation
from fl_app.app.server_app import server_components
from fl_app.cli import simulate
from fl_app.data.sources import data_source
from fl_app.data.types import DataSettings
from fl_app.ml.trainer import TrainSettings, trainer_for
from fl_app.server.checkpoint import (
    Checkpoint,
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    load_for_resume,
    save_checkpoint,
)
from fl_app.server.client_manager import SeededClientManager
from fl_app.server.runner import FederatedServer, ResumePoint
from fl_app.server.stopping import StoppingRules
from strategies import WeightedFedAvg
from strategies.compose import compose
from strategies.context import StrategyContext
from strategies.registry import strategy_names
from strategies.state import StrategyStateError, set_strategy_state
from tests.conftest import make_config
from tests.flower_objects import AnsweringProxy, IdleProxy, fit_res, random_model

STATEFUL = ["fedadam", "fedyogi", "fedadagrad", "fedavgm",
            *[name for name in ("dp-fixed", "dp-adaptive") if name in strategy_names()]]


def _checkpoint(cfg, weights, round_=3) -> Checkpoint:
    rng = np.random.default_rng(0)
    state = {"strategy": {"fedopt": {"m_t": [np.ones((2, 2))], "v_t": None}},
             "rng": rng.bit_generator.state, "tuple": (1, 2.5, "x"), "nested": [[np.int64(4)]]}
    history = {"config": dict(cfg), "rounds": [{"round": r, "centralized": {"loss": float("nan")}}
                                               for r in range(round_ + 1)], "stopped": None}
    return Checkpoint(round_, weights, state, history, dict(cfg))


def _model_weights(cfg):
    train = TrainSettings.from_config(cfg)
    return trainer_for(train, data_source(DataSettings.from_config(cfg)).spec).get_weights()


def test_checkpoint_round_trip_keeps_arrays_dtypes_big_ints_and_nan(tmp_path):
    cfg = make_config()
    weights = random_model(np.random.default_rng(1))
    saved = _checkpoint(cfg, weights)
    save_checkpoint(tmp_path, saved)
    loaded = load_checkpoint(tmp_path)
    assert loaded.round == 3 and loaded.config == dict(cfg)
    for a, b in zip(loaded.weights, weights, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.server_state["strategy"]["fedopt"]["m_t"][0],
                                  np.ones((2, 2)))
    assert loaded.server_state["rng"] == saved.server_state["rng"]  # 128-bit ints survive
    assert loaded.server_state["tuple"] == [1, 2.5, "x"]
    assert loaded.server_state["nested"] == [[4]]
    assert np.isnan(loaded.history["rounds"][-1]["centralized"]["loss"])
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.npz"]  # no temporary left


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at .*checkpoint.npz"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip-bytes"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    save_checkpoint(tmp_path, _checkpoint(make_config(), random_model(np.random.default_rng(1))))
    path = checkpoint_path(tmp_path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"\x00not a checkpoint" * 10)
    else:
        middle = len(data) // 3
        data[middle:middle + 8] = bytes(255 - b for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_checkpoint(tmp_path)


def test_resume_with_a_different_config_names_the_keys(tmp_path):
    cfg = make_config(local_epochs=2, out_dir=str(tmp_path))
    save_checkpoint(tmp_path, _checkpoint(cfg, _model_weights(cfg)))
    changed = cfg.replace(local_epochs=3, learning_rate=0.05, resume_from=str(tmp_path))
    with pytest.raises(CheckpointError, match="'local-epochs': checkpoint 2, now 3.*"
                                              "'learning-rate'"):
        load_for_resume(changed, _model_weights(cfg))
    # where results go, how many rounds in total and the round timeout may change
    allowed = cfg.replace(resume_from=str(tmp_path), num_server_rounds=40, round_timeout=60.0,
                          out_dir=str(tmp_path / "elsewhere"))
    assert load_for_resume(allowed, _model_weights(cfg)).round == 3


def test_resume_with_other_model_shapes_is_a_clear_error(tmp_path):
    cfg = make_config(resume_from=str(tmp_path))
    other = [np.zeros((3, 3), np.float32)]
    save_checkpoint(tmp_path, _checkpoint(cfg, other))
    with pytest.raises(CheckpointError, match="holds 1 weight arrays.*the model has 4"):
        load_for_resume(cfg, _model_weights(cfg))


def test_flwr_run_path_resume_from_key_restores_history_and_round(tmp_path):
    cfg = make_config(num_server_rounds=5, out_dir=str(tmp_path))
    saved = _checkpoint(cfg, _model_weights(cfg), round_=2)
    saved.server_state = {"strategy": {}, "stopped": None,
                          "client_manager": SeededClientManager(1).get_state(),
                          "stopping": StoppingRules().get_state()}
    save_checkpoint(tmp_path, saved)
    (tmp_path / "history.json").write_text('{"rounds": "a later, torn write"}')
    components = server_components(cfg.replace(out_dir="", resume_from=str(tmp_path)))
    assert components.server.resume.round == 2
    history = load_checkpoint(tmp_path).history
    on_disk = (tmp_path / "history.json").read_text()
    assert '"resumed_after": [\n    2\n  ]' in on_disk and len(history["rounds"]) == 3
    with pytest.raises(CheckpointError, match="'seed'"):
        server_components(cfg.replace(seed=1, resume_from=str(tmp_path)))


def test_run_simulation_resume_refuses_to_change_the_saved_config(tmp_path, capsys):
    cfg = make_config(out_dir=str(tmp_path))
    save_checkpoint(tmp_path, _checkpoint(cfg, _model_weights(cfg)))
    code = run_simulation.main(["--resume", str(tmp_path), "--run-config", "local-epochs=3"])
    assert code == 2
    assert "not 'local-epochs'" in capsys.readouterr().err
    assert run_simulation.main(["--resume", str(tmp_path / "missing")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_run_simulation_resume_takes_the_output_folder_from_out_not_out_dir(tmp_path):
    cfg = make_config(out_dir=str(tmp_path))
    save_checkpoint(tmp_path, _checkpoint(cfg, _model_weights(cfg)))
    with pytest.raises(CheckpointError, match="only max-epsilon, num-server-rounds, round-timeout, "
                                              "tensorboard, verbose may change, not 'out-dir'; "
                                              "use --out DIR"):
        simulate.resume_run_config(str(tmp_path), f"out-dir='{tmp_path / 'elsewhere'}'")
    resumed = simulate.resume_run_config(
        str(tmp_path), "num-server-rounds=40 round-timeout=5.0 max-epsilon=3.0")
    assert (resumed["num-server-rounds"], resumed["round-timeout"], resumed["max-epsilon"]) == (
        40, 5.0, 3.0)


# ---- strategy and server state
def _round(strategy, manager, server_round, params, rng):
    strategy.configure_fit(server_round, params, manager)
    current = parameters_to_ndarrays(params)
    results = [(IdleProxy(f"c{i}"), fit_res([(a + 0.1 * rng.normal(size=a.shape)).astype(a.dtype)
                                             for a in current], int(rng.integers(10, 90))))
               for i in range(4)]
    new, _ = strategy.aggregate_fit(server_round, results, [])
    return new


def _built(name, global_model):
    # DP noise replays exactly only when seeded (dp-noise-seed): unseeded noise is never
    # persisted (tests/test_dp_strategy.py checks that a restore draws fresh noise).
    seeded = {"dp_noise_seed": 7} if name.startswith("dp-") else {}
    cfg = make_config(strategy=name, min_fit_clients=2, min_available_clients=2, **seeded)
    strategy = compose(StrategyContext(cfg, ndarrays_to_parameters(global_model)))
    manager = SeededClientManager(0)
    for i in range(4):
        manager.register(IdleProxy(f"c{i}"))
    return strategy, manager


@pytest.mark.parametrize("name", STATEFUL)
def test_restored_strategy_state_continues_exactly_like_the_original(tmp_path, name):
    global_model = random_model(np.random.default_rng(2))
    original, manager = _built(name, global_model)
    params = original.initialize_parameters(manager)
    rng = np.random.default_rng(3)
    for server_round in (1, 2):
        params = _round(original, manager, server_round, params, rng)
    cfg = make_config()
    save_checkpoint(tmp_path, Checkpoint(2, parameters_to_ndarrays(params),
                                         {"strategy": original.get_state()}, {}, dict(cfg)))
    restored, _ = _built(name, global_model)
    restored.set_state(load_checkpoint(tmp_path).server_state["strategy"])

    fresh, _ = _built(name, global_model)  # what a silent fresh start would compute
    rng_a, rng_b, rng_c = (copy.deepcopy(rng) for _ in range(3))
    a = parameters_to_ndarrays(_round(original, manager, 3, params, rng_a))
    b = parameters_to_ndarrays(_round(restored, manager, 3, params, rng_b))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    try:
        c = parameters_to_ndarrays(_round(fresh, manager, 3, params, rng_c))
    except AssertionError:  # FedAvgM refuses a round > 1 without its momentum
        return
    assert any(not np.allclose(x, z) for x, z in zip(a, c))  # the state matters


def test_state_of_another_strategy_is_refused():
    global_model = random_model(np.random.default_rng(2))
    fedadam, _ = _built("fedadam", global_model)
    fedavgm, _ = _built("fedavgm", global_model)
    with pytest.raises(StrategyStateError, match="no 'fedavgm' entry"):
        set_strategy_state(fedavgm.inner, fedadam.get_state())


def test_a_fedopt_state_without_its_weights_is_refused():
    fedadam, _ = _built("fedadam", random_model(np.random.default_rng(2)))
    state = fedadam.get_state()
    state["fedopt"]["current_weights"] = None  # what no saved state holds: an altered file
    with pytest.raises(StrategyStateError, match="no current weights"):
        set_strategy_state(fedadam.inner, state)


def test_client_sampling_continues_the_same_sequence_after_restore(tmp_path):
    def manager(seed):
        m = SeededClientManager(seed)
        for i in range(10):
            m.register(IdleProxy(f"c{i}"))
        return m

    original = manager(5)
    for _ in range(3):
        original.sample(4)
    save_checkpoint(tmp_path, Checkpoint(3, [], {"cm": original.get_state()}, {}, {}))
    restored = manager(99)
    restored.set_state(load_checkpoint(tmp_path).server_state["cm"])
    for _ in range(3):
        assert [c.cid for c in original.sample(4)] == [c.cid for c in restored.sample(4)]


def _acc(accuracy: float) -> dict:
    """A round record whose centralized evaluation measured `accuracy`."""
    return {"centralized": {"loss": 1.0, "accuracy": accuracy}}


def test_stopping_rules_state_round_trip():
    rules = StoppingRules("accuracy", patience=2)
    assert rules.after_round(_acc(0.5)) is None and rules.after_round(_acc(0.4)) is None
    restored = StoppingRules("accuracy", patience=2)
    restored.set_state(rules.get_state())
    assert restored.after_round(_acc(0.45)) == "patience"


def test_idle_rounds_in_a_row_stop_the_run_and_survive_a_restore():
    rules = StoppingRules("accuracy", max_idle_rounds=3)
    assert rules.after_round(_acc(0.5), accepted_updates=0) is None
    assert rules.after_round(_acc(0.5), accepted_updates=4) is None  # an update resets the count
    assert rules.after_round({}, 0) is None and rules.after_round({}, 0) is None
    restored = StoppingRules("accuracy", max_idle_rounds=3)
    restored.set_state(json.loads(json.dumps(rules.get_state())))
    assert restored.after_round(_acc(0.5), accepted_updates=0) == "no-client-updates"
    assert StoppingRules("accuracy").after_round(_acc(0.5), 0) is None  # disabled


def test_a_new_run_starts_from_the_seeded_model_not_the_last_run_in_the_process(tmp_path):
    cfg = make_config(out_dir=str(tmp_path))
    first = server_components(cfg).server.strategy.initialize_parameters(None)
    trainer_weights = _model_weights(cfg)  # the process-wide trainer a previous run moved
    settings = DataSettings.from_config(cfg)
    train = TrainSettings.from_config(cfg)
    trainer_for(train, data_source(settings).spec).set_weights([w + 1.0 for w in trainer_weights])
    second = server_components(cfg).server.strategy.initialize_parameters(None)
    for a, b in zip(parameters_to_ndarrays(first), parameters_to_ndarrays(second), strict=True):
        np.testing.assert_array_equal(a, b)


def test_resuming_a_run_that_had_stopped_runs_no_more_rounds():
    params = ndarrays_to_parameters(random_model(np.random.default_rng(0)))
    state = {"strategy": {}, "client_manager": SeededClientManager(0).get_state(),
             "stopping": {"best": 0.9, "rounds_since_best": 0}, "stopped": "target"}
    rounds, finished = [], []
    server = FederatedServer(strategy=WeightedFedAvg(), seed=0,
                             stopping=StoppingRules("accuracy", target=0.9),
                             on_round=lambda record, p: rounds.append(record),
                             on_finish=lambda reason, p: finished.append((reason, p)),
                             resume=ResumePoint(4, params, state))
    server.fit(num_rounds=10, timeout=None)
    assert rounds == [] and finished == [("target", params)]


class _ChargingFedAvg(WeightedFedAvg):
    """WeightedFedAvg that also plays PrivacyAccounting: charges a ledger when it aggregates."""

    def __init__(self, events: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        self.events, self.charged = events, 0

    def aggregate_fit(self, server_round, results, failures):
        self.charged += 1
        self.events.append(f"aggregate {server_round}")
        return self.initial_parameters, {}

    def privacy_report(self, server_round):
        return {"epsilon": float(self.charged), "delta": 1e-5}

    def budget_allows(self, server_round, client_manager):
        return True

    def ledger(self):
        return {"delta": 1e-5, "rounds": [{}] * self.charged}

    def restore_ledger(self, ledger):
        self.charged = max(self.charged, len(ledger["rounds"]))


def test_the_privacy_ledger_is_saved_before_anything_of_the_round_is_released():
    """The ledger charging round t must be persisted before round t's model is evaluated,
    recorded (history.json) or checkpointed."""
    events: list[str] = []
    model = random_model(np.random.default_rng(1))

    def evaluate(server_round, arrays, config):
        events.append(f"evaluate {server_round}")
        return 0.0, {"accuracy": 0.5}

    strategy = _ChargingFedAvg(events, initial_parameters=ndarrays_to_parameters(model),
                               evaluate_fn=evaluate, fraction_evaluate=0.0, min_fit_clients=1,
                               min_available_clients=1)
    server = FederatedServer(
        strategy=strategy, seed=0, stopping=StoppingRules(),
        on_round=lambda record, p: events.append(f"record {record['round']}"),
        on_finish=lambda reason, p: None,
        on_checkpoint=lambda r, p, state: events.append(f"checkpoint {r}"),
        on_charge=lambda ledger: events.append(f"ledger {len(ledger['rounds'])}"))
    server.client_manager().register(AnsweringProxy("c0"))
    server.fit(num_rounds=2, timeout=None)
    for t in (1, 2):
        charged = events.index(f"ledger {t}")
        assert events.index(f"aggregate {t}") < charged
        assert charged < min(events.index(f"evaluate {t}"), events.index(f"record {t}"),
                             events.index(f"checkpoint {t}"))


def test_run_outputs_are_private_files_in_a_private_folder(tmp_path):
    import os
    import stat

    from fl_app.server.outputs import save_plots, write_history

    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        rounds = [{"round": r, "centralized": {"accuracy": 0.5, "loss": 1.0}} for r in (0, 1)]
        written = [write_history(out, {"rounds": rounds}), *save_plots(out, rounds)]
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    assert written and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in written)
