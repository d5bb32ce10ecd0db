"""The app's run-config schema, assembled from the settings every layer declares.

`flwr run .` (through `Context.run_config`) and `run_simulation.py` both resolve their
settings through `resolve()`, so they cannot drift apart. Keys are kebab-case, as in
Flower's own apps. Each layer declares its own keys (a `SETTINGS` list) and rules across
them (a `check_config(values)` raising `ConfigError`) in one module, listed in
`SETTING_MODULES`; the strategy registry collects those of every strategy module itself.
"""

from __future__ import annotations

from collections.abc import Mapping

from fl_app.client import faults, local_work
from fl_app.data import settings as data_settings
from fl_app.ml import settings as ml_settings
from fl_app.schema import ConfigError, RunConfig, Scalar, Schema, Setting, module_checks
from fl_app.server import settings as server_settings
from strategies import registry
from strategies.accounting import PrivacyAccountant
from strategies.secure import evaluate_fraction

RUN_SETTINGS = [
    Setting("seed", int, 42, "Seed for initial weights, partitioning, sampling and shuffling.",
            "run", low=0),
]


def _check_evaluation_data(values: Mapping[str, Scalar]) -> None:
    if values["validation-fraction"] == 0 and evaluate_fraction(values) > 0:
        raise ConfigError(
            "run-config key 'validation-fraction' is 0, so clients keep no validation data, "
            f"but 'fraction-evaluate' is {values['fraction-evaluate']}: set "
            "fraction-evaluate=0 (distributed evaluation off) or validation-fraction > 0"
        )


SETTING_MODULES = [server_settings, registry, ml_settings, data_settings, faults, local_work]
SCHEMA = Schema([*RUN_SETTINGS, *(s for module in SETTING_MODULES for s in module.SETTINGS)],
                [_check_evaluation_data, module_checks(SETTING_MODULES)])


def resolve(raw: Mapping[str, object]) -> RunConfig:
    """Validate `raw` against the app's schema and fill in defaults (see `Schema.resolve`);
    `task='auto'` on a data file follows the model's compiled loss where it settles the task
    (`fl_app.ml.task`: every entry point, server and clients, resolves the same task)."""
    from fl_app.ml.task import settle_task

    return settle_task(SCHEMA.resolve(raw))


def all_settings() -> dict[str, Setting]:
    """Every run-config key, in the order pyproject.toml and docs/config.md list them."""
    return SCHEMA.settings


def defaults() -> dict[str, Scalar]:
    """The default value of every key (what `[tool.flwr.app.config]` must hold)."""
    return SCHEMA.defaults()


def check_num_clients(cfg: Mapping[str, Scalar], num_clients: int) -> None:
    """Raise ConfigError, naming the keys, if `cfg` cannot run on `num_clients` clients.

    Checks the sampling minimums (a round would wait for clients that never come), enough
    clients for `standardize`'s statistics round (`fl_app.server.settings.MIN_REPLIES`), the
    number of synthetic users (one per client), the fault and attack roles, a DP
    `target-delta` below 1/N and, with Poisson sampling, an empty sample far less likely
    than δ.
    """
    keys = ["min-fit-clients", "min-available-clients",
            *(["min-evaluate-clients"] if evaluate_fraction(cfg) > 0 else [])]
    too_many = [f"'{key}' ({cfg[key]})" for key in keys if int(cfg[key]) > num_clients]
    if too_many:
        raise ConfigError(f"run-config key(s) {', '.join(too_many)} exceed the {num_clients} "
                          "clients of the federation: rounds would wait for clients that never "
                          "connect; lower them or add clients")
    if cfg["dataset"] == "synthetic" and cfg["synthetic-num-users"] != num_clients:
        raise ConfigError(f"run-config key 'synthetic-num-users' ({cfg['synthetic-num-users']}) "
                          f"must equal the number of clients ({num_clients}): dataset "
                          "'synthetic' gives each client the data of one user")
    faults.role_counts(faults.FaultSettings.from_config(cfg), num_clients)
    needed = max(int(cfg["min-fit-clients"]), server_settings.MIN_REPLIES)
    if cfg["standardize"] and num_clients < needed:
        raise ConfigError(f"run-config key 'standardize' is true with {num_clients} clients: "
                          f"the statistics round needs replies from at least {needed} "
                          f"(the larger of min-fit-clients and {server_settings.MIN_REPLIES}), "
                          "or the pooled statistics would be one or two clients' own; add "
                          "clients or set standardize=false")
    if str(cfg["strategy"]).startswith("dp-"):
        PrivacyAccountant(str(cfg["accountant"]), str(cfg["dp-sampling"]),
                          float(cfg["fraction-fit"]), float(cfg["target-delta"])
                          ).fix_delta(num_clients)
