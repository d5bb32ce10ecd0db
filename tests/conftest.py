"""Shared test helpers."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Every Ray the tests start (Flower's `run_simulation` called directly, the simulation
# runtime of `flwr run`, subprocesses) is private, as run_simulation.py makes its own
# (`fl_app.cli.simulate.simulation_ray`): its nodes stay on 127.0.0.1, and its temporary
# folder lies in a fresh 0700 folder, short (Ray's socket paths must stay under 108 bytes).
# tests/test_simulation_ray.py checks run_simulation.py's own without these variables.
if "RAY_TMPDIR" not in os.environ:
    RAY_TEST_DIR = tempfile.mkdtemp(prefix="fl-ray-tests-", dir="/tmp")
    atexit.register(shutil.rmtree, RAY_TEST_DIR, ignore_errors=True)
    os.environ["RAY_TMPDIR"] = RAY_TEST_DIR
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from fl_app.app.config import resolve  # noqa: E402
from fl_app.data.types import DataSettings  # noqa: E402
from fl_app.schema import RunConfig  # noqa: E402


def make_config(**overrides) -> RunConfig:
    """A resolved run config; python-style names (local_epochs) map to kebab-case keys."""
    return resolve({key.replace("_", "-"): value for key, value in overrides.items()})


def data_settings(**overrides) -> DataSettings:
    """The data layer's settings of `make_config(**overrides)`."""
    return DataSettings.from_config(make_config(**overrides))


@pytest.fixture
def small_config() -> RunConfig:
    """Digits with few rounds: the workload most tests use."""
    return make_config(num_server_rounds=2, local_epochs=1)


@pytest.fixture
def identity(monkeypatch):
    """A task's identity, which a Message built outside a ServerApp or ClientApp needs."""
    from flwr.supercore.task_identity import TaskIdentity

    for attribute in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attribute, 1)

