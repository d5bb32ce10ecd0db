"""Shared test helpers."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fl_app.app.config import resolve
from fl_app.schema import RunConfig  # noqa: E402


def make_config(**overrides) -> RunConfig:
    """A resolved run config; python-style names (local_epochs) map to kebab-case keys."""
    return resolve({key.replace("_", "-"): value for key, value in overrides.items()})


@pytest.fixture
def small_config() -> RunConfig:
    """Digits with few rounds: the workload most tests use."""
    return make_config(num_server_rounds=2, local_epochs=1)
