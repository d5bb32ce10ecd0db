"""Federated training from Python, for arrays and a model held in a notebook:

    from fl_app.api import run
    history = run(model, x, y, num_clients=10, partitioner="dirichlet", num_server_rounds=20)

and the app's parts for a Flower user's own ServerApp (docs/flower-users.md): `client_app`,
the Keras ClientApp configured by keyword, `initial_parameters`, its model's starting
weights for a server strategy (FedAdam and the other FedOpt strategies need them), and
`server_strategy`, the app's validated strategy chain around any client.

It runs the same simulation as `run_simulation.py` (same config schema, checks, outputs:
history.json, history.csv, final_model.keras, plots in `out_dir`) and returns the history;
`callbacks` (`fl_app.server.callbacks.Callback` subclasses) get every round's record as
the run goes. The model
(compiled) and the arrays are handed to the simulated clients through a private temporary
folder (0700, deleted afterwards): a model with custom layers or losses needs them
registered with `@keras.saving.register_keras_serializable` in an importable module.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.clientapp import ClientApp
from flwr.common import Parameters, ndarrays_to_parameters
from flwr.server.strategy import Strategy

from fl_app.app.client_app import make_client_app
from fl_app.app.config import check_num_clients, defaults, resolve
from fl_app.cli.simulate import check_user_keys, parse_args, simulate
from fl_app.cli.summary import print_summary
from fl_app.data.types import DataSettings
from fl_app.schema import ConfigError, Scalar
from fl_app.server.callbacks import Callback
from fl_app.server.outputs import private_files, read_history, resolve_out_dir
from fl_app.server.run_clock import run_start
from strategies.compose import compose
from strategies.context import ConfigFn, EvaluateFn, StrategyContext


def _kebab(config: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """Python keyword names (`local_epochs`) as run-config keys (`local-epochs`)."""
    return {key.replace("_", "-"): value for key, value in config.items()}


def _config(config: Mapping[str, Scalar]) -> Any:
    """The run config of `config`'s keys in Python spelling over every default, checked
    (ConfigError naming the key)."""
    return resolve({**defaults(), **_kebab(config)})


def client_app(**config: Scalar) -> ClientApp:
    """The app's Keras ClientApp, for a ServerApp of your own (Flower's `FedAvg`,
    `FedAdam`, ...): each node trains `model` on its partition of `dataset` with the run's
    local work, as under this app's own server. `config` takes any run-config key in Python
    spelling (`model="cnn"`, `local_epochs=2`, `partitioner="dirichlet"`); the simulated
    nodes' `partition-id` and `num-partitions` (Flower's node config) pick the partition.
    Keys that need this app's server (`secure_aggregation`, `homomorphic_encryption`,
    `compress_up`/`compress_down`, `prune_sparsity`, `standardize`, `fuse_evaluate`) mean
    nothing to another server: leave them unset. Raises ConfigError on a bad key or value.
    """
    return make_client_app(fixed_config=_config(config))


def initial_parameters(**config: Scalar) -> Parameters:
    """The initial weights of the model `config` builds (the same keys as `client_app`),
    as Flower `Parameters`: a server strategy's `initial_parameters` (FedAdam, FedYogi and
    FedAdagrad need them), equal to the weights every client starts from."""
    from fl_app.data.sources import data_spec
    from fl_app.ml.models import build_model  # imports TensorFlow

    cfg = _config(config)
    spec = data_spec(DataSettings.from_config(cfg))
    model = build_model(str(cfg["model"]), spec, int(cfg["seed"]))
    return ndarrays_to_parameters(model.get_weights())


APP_ONLY = ("secure-aggregation", "homomorphic-encryption", "compress-up", "compress-down",
            "prune-sparsity", "standardize", "fuse-evaluate", "server-loop")
"""Run-config keys whose protocol needs this app's own server loop and clients:
`server_strategy` refuses any of them set away from its default (which is off)."""


def server_strategy(*, initial_parameters: Parameters,
                    evaluate_fn: EvaluateFn | None = None,
                    on_fit_config_fn: ConfigFn | None = None,
                    on_evaluate_config_fn: ConfigFn | None = None,
                    **config: Scalar) -> Strategy:
    """The app's server strategy for a ServerApp of your own, around any client: the
    strategy `strategy` names (default `weighted-fedavg`; `dp-fixed` and the other DP
    wrappers around `dp_inner`) with every layer the same keys add under this app's server
    (stragglers, pruning, compression), always behind `ValidatedStrategy`: a non-finite,
    misshapen or over-claiming update is rejected and logged, never averaged in.
    `config` takes any run-config key in Python spelling (`min_fit_clients=3`,
    `noise_multiplier=1.0`); a DP strategy reports ε and δ so far as the fit metrics
    `dp_epsilon` and `dp_delta`, so they reach Flower's `History`. Keys whose protocol
    needs this app's server loop or its clients (`APP_ONLY`: SecAgg+, homomorphic
    encryption, the update codecs, pruning, standardization, fused evaluation, FedBuff)
    are refused: around another server or client they would aggregate the wrong thing.
    Raises ConfigError on a bad key or value, or a combination the strategy cannot run."""
    cfg = _config(config)
    off = defaults()
    used = [f"{key}={cfg[key]!r}" for key in APP_ONLY if cfg[key] != off[key]]
    if used:
        raise ConfigError(
            f"run-config key(s) {', '.join(used)} cannot be used with server_strategy: they "
            "need this app's server loop and clients (run_simulation.py, flwr run .), not "
            "your own ServerApp and ClientApp")
    return compose(StrategyContext(
        cfg, initial_parameters, evaluate_fn=evaluate_fn,
        on_fit_config_fn=on_fit_config_fn, on_evaluate_config_fn=on_evaluate_config_fn),
        meter=False)


def run(model: Any, x: np.ndarray, y: np.ndarray, *, num_clients: int = 10,
        out_dir: str | Path = "", callbacks: Sequence[Callback] = (),
        **config: Scalar) -> dict[str, Any]:
    """Train `model` federatedly over `num_clients` simulated clients that share `(x, y)`.

    `model` is a compiled `keras.Model` or any `model` key value (builder name, `.keras`
    path, `package.module:function`). `x` holds the features (one row per example), `y`
    the targets; the server holds out `test_fraction` of them and the configured
    partitioner splits the rest. `config` takes any run-config key in Python spelling
    (`num_server_rounds=20`, `partitioner="dirichlet"`, `tensorboard=True`). `callbacks`
    get `on_run_begin`, `on_round_end(server_round, record)` per round and `on_run_end`
    (see `fl_app.server.callbacks`). Raises ConfigError, DataError or
    ModelError (as `run_simulation.py` would print them) before any training.
    """
    started_at = run_start(command=False)
    from fl_app.app.preflight import checked_trainer  # imports TensorFlow

    with tempfile.TemporaryDirectory(prefix="fl-keras-") as folder:  # created 0700
        data = Path(folder) / "data.npz"
        model_value = model if isinstance(model, str) else str(Path(folder) / "model.keras")
        with private_files():
            np.savez(data, x=np.asarray(x), y=np.asarray(y))
            if not isinstance(model, str):
                model.save(model_value)
        out = resolve_out_dir(str(out_dir))
        cfg = resolve({**defaults(), **_kebab(config), "dataset": str(data),
                       "model": model_value, "out-dir": str(out)})
        check_num_clients(cfg, num_clients)
        check_user_keys(cfg, None)  # HE: a he-public-context without the nodes' key is refused
        checked_trainer(cfg)
        seconds = simulate(cfg, parse_args(["--num-supernodes", str(num_clients)]),
                           callbacks, started_at)
    print_summary(out, seconds)
    return read_history(out)
