"""App errors logged by Flower's runtime become one `error:` line; other errors keep their
traceback. Logged through Flower's own `log`, as its runtimes log a failed ServerApp."""

from __future__ import annotations

import logging
from logging import ERROR

import pytest
from flwr.common.logger import log

from fl_app.app.logs import OneLineAppErrors, report_app_errors_in_one_line
from fl_app.app.server_app import make_server_app
from fl_app.data.types import DataError
from fl_app.ml.errors import ModelError
from fl_app.schema import ConfigError


@pytest.fixture
def flower_log():
    """Everything Flower's logger emits while the test runs, formatted with tracebacks."""
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(logging.Formatter("%(levelname)s %(message)s").format(record))

    handler = Capture()
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    report_app_errors_in_one_line()
    yield lines
    logger.removeHandler(handler)


def _log_failure(exc: BaseException) -> None:
    try:
        raise exc
    except Exception as ex:  # as flwr.simulation.app and flwr-serverapp log a failed app
        log(ERROR, "%s raised an exception", "ServerApp", exc_info=ex)


@pytest.mark.parametrize("error", [
    ConfigError("run-config key 'x' must be of type int; allowed: 1 <= value"),
    ModelError("run-config key 'model': file /nowhere.keras does not exist"),
    DataError("data file d.csv has no label column 'y'"),
])
def test_an_app_error_is_one_error_line(flower_log, error):
    _log_failure(error)
    assert flower_log == [f"ERROR error: {error}"]


def test_an_app_error_raised_from_inside_another_is_found(flower_log):
    try:
        try:
            raise ConfigError("run-config key 'seed' is out of range")
        except ConfigError as inner:
            raise RuntimeError("An error was encountered. Ending simulation.") from inner
    except RuntimeError as outer:
        _log_failure(outer)
    assert flower_log == ["ERROR error: run-config key 'seed' is out of range"]


def test_any_other_error_keeps_its_traceback(flower_log):
    _log_failure(KeyError("a bug"))
    assert len(flower_log) == 1
    assert flower_log[0].startswith("ERROR ServerApp raised an exception\nTraceback")
    assert "KeyError: 'a bug'" in flower_log[0]


def test_the_server_app_installs_the_filter_once():
    logger = logging.getLogger("flwr")
    make_server_app()
    make_server_app()
    assert sum(isinstance(f, OneLineAppErrors) for f in logger.filters) == 1
