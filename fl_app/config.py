"""The run-config schema: every key, its type, default and check.

`flwr run .` (through `Context.run_config`) and `run_simulation.py` both resolve their
settings through `resolve()`, so they cannot drift apart. Keys are kebab-case, as in
Flower's own apps. Other modules contribute their own keys (a `SETTINGS` list) and rules
across keys (a `check_config(values)` raising `ConfigError`): the reliability modules named
in `_contributing_modules` and the strategy modules of `strategies.registry`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from functools import lru_cache
from types import ModuleType

from fl_app.settings import ConfigCheck, ConfigError, Scalar, Setting, module_checks

IDLE_STOP = "no-client-updates"  # history's "stopped" when `max-idle-rounds` ends a run


def _model_names() -> list[str]:
    from fl_app.models import MODEL_BUILDERS

    return sorted(MODEL_BUILDERS)


def _dataset_names() -> list[str]:
    from fl_app.data import DATASET_NAMES

    return list(DATASET_NAMES)


def _partitioner_names() -> list[str]:
    from fl_app.partitioning import PARTITIONER_NAMES

    return list(PARTITIONER_NAMES)


def _strategy_names() -> list[str]:
    from strategies.registry import strategy_names

    return strategy_names()


def _is_hub_dataset(value: Scalar) -> bool:
    """`hf:<hub id>` with a non-empty id."""
    return str(value).startswith("hf:") and bool(str(value).removeprefix("hf:").strip())


CORE_SETTINGS: list[Setting] = [
    # --- the run
    Setting("num-server-rounds", int, 20, "Maximum number of federated rounds.", "run", low=1),
    Setting("strategy", str, "weighted-fedavg", "Server strategy, by registry name.", "run",
            choices=_strategy_names),
    Setting("seed", int, 42, "Seed for initial weights, partitioning, sampling and shuffling.",
            "run", low=0),
    Setting("target-accuracy", float, 0.0,
            "Stop once centralized accuracy reaches this value (0 disables).", "run",
            low=0.0, high=1.0),
    Setting("patience", int, 0,
            "Stop after this many rounds without a better centralized accuracy (0 disables).",
            "run", low=0),
    Setting("max-idle-rounds", int, 3,
            "Stop after this many rounds in a row in which no client update made it into the "
            "model (every client failed, timed out or was rejected, or the round was skipped; "
            "0 disables).", "run", low=0),
    Setting("round-timeout", float, 0.0,
            "Seconds a round waits for its clients (0 waits forever); clients are started "
            "before round 1, so their start-up does not count.", "run", low=0.0),
    Setting("out-dir", str, "",
            "Folder for history.json, final_model.keras and plots "
            "(empty: outputs/<timestamp> under the working directory).", "run"),
    # --- client sampling (shared by every strategy)
    Setting("fraction-fit", float, 1.0, "Fraction of available clients sampled for training.",
            "sampling", low=0.0, high=1.0, low_open=True),
    Setting("fraction-evaluate", float, 1.0,
            "Fraction of available clients sampled for distributed evaluation (0 disables).",
            "sampling", low=0.0, high=1.0),
    Setting("min-fit-clients", int, 2, "Minimum number of clients sampled for training.",
            "sampling", low=1),
    Setting("min-evaluate-clients", int, 2, "Minimum number of clients sampled for evaluation.",
            "sampling", low=0),
    Setting("min-available-clients", int, 2, "Minimum number of connected clients to start a round.",
            "sampling", low=1),
    Setting("accept-failures", bool, True,
            "Aggregate a round even if some clients failed (otherwise skip the round).",
            "sampling"),
    Setting("max-examples", int, 0,
            "Reject updates claiming more than this many examples (0: no cap).", "sampling",
            low=0),
    # --- local training
    Setting("local-epochs", int, 5, "Local epochs per round (sent in each round's config).",
            "training", low=1),
    Setting("batch-size", int, 16, "Local batch size (sent in each round's config).",
            "training", low=1),
    Setting("learning-rate", float, 0.1, "Local learning rate (sent in each round's config).",
            "training", low=0.0, low_open=True),
    Setting("optimizer", str, "sgd", "Local Keras optimizer.", "training",
            choices=("sgd", "adam")),
    Setting("model", str, "mlp", "Keras model: a builder name or a path to a .keras file.",
            "training", choices=_model_names, check=lambda v: str(v).endswith(".keras"),
            check_hint="a path ending in '.keras'"),
    # --- data
    Setting("dataset", str, "digits",
            "Dataset: embedded digits, generated Synthetic(alpha,beta), or a hub dataset "
            "(needs network).", "data", choices=_dataset_names,
            check=_is_hub_dataset, check_hint="'hf:<hub id>'"),
    Setting("partitioner", str, "iid", "flwr-datasets partitioner that splits the training pool.",
            "data", choices=_partitioner_names),
    Setting("dirichlet-alpha", float, 0.3, "Concentration of the Dirichlet partitioner.", "data",
            low=0.0, low_open=True),
    Setting("classes-per-partition", int, 2, "Classes per client for the pathological partitioner.",
            "data", low=1),
    Setting("shards-per-partition", int, 2, "Shards per client for the shard partitioner.", "data",
            low=1),
    Setting("validation-fraction", float, 0.1,
            "Fraction of each client's data kept for its local validation, on which "
            "distributed evaluation runs (0 requires fraction-evaluate=0).", "data",
            low=0.0, high=0.5),
    Setting("test-fraction", float, 0.2,
            "Fraction of the dataset held out on the server for centralized evaluation.", "data",
            low=0.0, high=0.5, low_open=True),
    Setting("synthetic-alpha", float, 1.0, "Synthetic(alpha,beta): model heterogeneity.", "data",
            low=0.0),
    Setting("synthetic-beta", float, 1.0, "Synthetic(alpha,beta): data heterogeneity.", "data",
            low=0.0),
    Setting("synthetic-num-users", int, 10,
            "Synthetic(alpha,beta): number of users; each client holds one user's data, so "
            "it must equal the number of clients.", "data", low=1),
    Setting("synthetic-dim", int, 60, "Synthetic(alpha,beta): feature dimension.", "data", low=1),
    Setting("synthetic-classes", int, 10, "Synthetic(alpha,beta): number of classes.", "data",
            low=2),
]


def _contributing_modules() -> list[ModuleType]:
    """The non-strategy modules with their own `SETTINGS` (and maybe `check_config`)."""
    from fl_app import checkpoint, faults
    from strategies import validation

    return [validation, checkpoint, faults]


@lru_cache(maxsize=1)
def all_settings() -> dict[str, Setting]:
    """Every run-config key (core, reliability: validation, checkpoints, faults; strategies)."""
    from strategies.registry import strategy_settings

    settings: dict[str, Setting] = {}
    contributed = [s for module in _contributing_modules() for s in module.SETTINGS]
    for setting in [*CORE_SETTINGS, *contributed, *strategy_settings()]:
        if setting.key in settings:
            raise RuntimeError(f"run-config key '{setting.key}' is declared twice")
        settings[setting.key] = setting
    return settings


def all_checks() -> list[ConfigCheck]:
    """Every cross-key rule: the core's, then each contributing module's `check_config`."""
    from strategies.registry import strategy_checks

    return [*CORE_CHECKS, *module_checks(_contributing_modules()), *strategy_checks()]


def defaults() -> dict[str, Scalar]:
    """The default value of every key (what `[tool.flwr.app.config]` must hold)."""
    return {key: s.default for key, s in all_settings().items()}


class RunConfig(Mapping[str, Scalar]):
    """A resolved, validated run config; read it like Flower's `context.run_config`."""

    def __init__(self, values: Mapping[str, Scalar]) -> None:
        self._values = dict(values)

    def __getitem__(self, key: str) -> Scalar:
        try:
            return self._values[key]
        except KeyError:
            raise KeyError(f"unknown run-config key '{key}'") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._values.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunConfig) and self._values == other._values

    def replace(self, **changes: Scalar) -> RunConfig:
        """Return a copy with some keys changed (python-style names: out_dir -> out-dir)."""
        raw = dict(self._values)
        raw.update({k.replace("_", "-"): v for k, v in changes.items()})
        return resolve(raw)


def resolve(raw: Mapping[str, object]) -> RunConfig:
    """Validate `raw` against the schema and fill in defaults.

    Raises ConfigError naming the key at fault for an unknown key, a wrong type, an
    out-of-range value or a broken rule across keys (`all_checks`), before any training
    starts.
    """
    settings = all_settings()
    unknown = sorted(set(raw) - set(settings))
    if unknown:
        raise ConfigError(
            f"unknown run-config key(s): {', '.join(repr(k) for k in unknown)}; "
            f"known keys: {', '.join(sorted(settings))}"
        )
    values = {key: s.coerce(raw[key]) if key in raw else s.default for key, s in settings.items()}
    for check in all_checks():
        check(values)
    return RunConfig(values)


def _check_sampling_minimums(values: Mapping[str, Scalar]) -> None:
    if values["min-fit-clients"] > values["min-available-clients"]:
        raise ConfigError(
            f"run-config key 'min-fit-clients' ({values['min-fit-clients']}) must not exceed "
            f"'min-available-clients' ({values['min-available-clients']})"
        )


def _check_evaluation_data(values: Mapping[str, Scalar]) -> None:
    if values["validation-fraction"] == 0 and values["fraction-evaluate"] > 0:
        raise ConfigError(
            "run-config key 'validation-fraction' is 0, so clients keep no validation data, "
            f"but 'fraction-evaluate' is {values['fraction-evaluate']}: set "
            "fraction-evaluate=0 (distributed evaluation off) or validation-fraction > 0"
        )


CORE_CHECKS: list[ConfigCheck] = [_check_sampling_minimums, _check_evaluation_data]


def check_num_clients(cfg: Mapping[str, Scalar], num_clients: int) -> None:
    """Raise ConfigError, naming the keys, if `cfg` cannot run on `num_clients` clients.

    Checks the sampling minimums (a round would wait for clients that never come), the
    number of synthetic users (one per client) and the fault and attack roles.
    """
    from fl_app.faults import role_counts

    keys = ["min-fit-clients", "min-available-clients",
            *(["min-evaluate-clients"] if cfg["fraction-evaluate"] > 0 else [])]
    too_many = [f"'{key}' ({cfg[key]})" for key in keys if cfg[key] > num_clients]
    if too_many:
        raise ConfigError(f"run-config key(s) {', '.join(too_many)} exceed the {num_clients} "
                          "clients of the federation: rounds would wait for clients that never "
                          "connect; lower them or add clients")
    if cfg["dataset"] == "synthetic" and cfg["synthetic-num-users"] != num_clients:
        raise ConfigError(f"run-config key 'synthetic-num-users' ({cfg['synthetic-num-users']}) "
                          f"must equal the number of clients ({num_clients}): dataset "
                          "'synthetic' gives each client the data of one user")
    role_counts(cfg, num_clients)
