"""The console's logging: the libraries kept quiet, the app's errors in one line.

**Quiet libraries.** A console that shows the run, not its libraries: unless `verbose`,
TensorFlow's start-up lines, absl and Ray logging, deprecation warnings and Flower's
per-call INFO lines (`configure_fit`, `aggregate_*`, the `[SUMMARY]` dump, deprecation
notices) are kept off. Warnings and errors still show.

TensorFlow (2.21) writes its oneDNN notice through absl's C++ logging while its library
loads, before `TF_CPP_MIN_LOG_LEVEL` or any Python logger can act, so it is loaded with the
process's standard error (file descriptor 2) pointed at the null device
(`import_tensorflow_quietly`). Every entry point (run_simulation, the ServerApp, the
ClientApp) calls `quiet_libraries` before anything imports TensorFlow.

**One-line errors.** When a ServerApp raises, Flower's runtime (`flwr-simulation` under
`flwr run .`, `flwr-serverapp` in a deployment) logs "ServerApp/Simulation raised an
exception" with the whole traceback: some forty lines of Flower's own frames around one line
that matters. The app's errors (`ConfigError`, `ModelError`, `DataError`) already name the
key, file or client and the fix, so `OneLineAppErrors`, a filter on Flower's logger,
rewrites such a record to `error: <message>` and drops the traceback. Any other exception
keeps its traceback: it is a bug, and the frames are what one needs to fix it. Flower still
ends the run as `finished:failed` with the message in its details (`flwr ls --run-id N`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from fl_app.data.types import DataError
from fl_app.ml.errors import ModelError
from fl_app.schema import ConfigError

LIBRARY_LOGGERS = ("tensorflow", "absl", "ray", "h5py")
# Categories of warnings that concern the libraries' authors, not the user of a run.
DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning)
NOISY_MODULES = r"(ray|flwr|keras|tensorflow|absl|google)(\..*)?"


# Flower's notices that a quiet console leaves out: deprecations (run_simulation.py uses
# `flwr.simulation.run_simulation` on purpose) and the simulation engine's own report of a
# failed client, traceback included (the round's progress line counts it and the server
# logs one line naming the client; history.json keeps the whole error).
FLOWER_NOTICES = ("DEPRECATED FEATURE", "processing a message by RayBackend",
                  "ClientAppException", "Message TTL has expired")


class _DropNotices(logging.Filter):
    """Drops Flower's log records that contain one of `FLOWER_NOTICES`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in FLOWER_NOTICES)


_FLOWER_FILTER = _DropNotices()


@contextmanager
def stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at the null device inside (what C++ code writes there is
    dropped; Python exceptions still propagate and print after)."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def import_tensorflow_quietly() -> None:
    """Import TensorFlow now (if not yet), without its start-up lines on standard error."""
    if "tensorflow" in sys.modules:
        return
    with stderr_silenced():
        import tensorflow  # noqa: F401  (loaded for its side effect: the library is in)


def _flower_console(verbose: bool) -> None:
    from flwr.common.logger import console_handler

    console_handler.setLevel(logging.INFO if verbose else logging.WARNING)
    if verbose:
        console_handler.removeFilter(_FLOWER_FILTER)
    else:
        console_handler.addFilter(_FLOWER_FILTER)  # added once: a filter list holds no twins


def quiet_libraries(verbose: bool) -> None:
    """Unless `verbose`: TensorFlow, absl and Ray log only errors, deprecation warnings and
    the libraries' FutureWarnings are ignored, Flower's console shows only warnings and
    errors, and TensorFlow is imported quietly. With `verbose`, Flower's console shows its
    INFO lines again (the rest keeps the libraries' own defaults)."""
    _flower_console(verbose)
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category in DEPRECATIONS:
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=FutureWarning, module=NOISY_MODULES)
    import_tensorflow_quietly()


APP_ERRORS = (ConfigError, ModelError, DataError)
FLOWER_LOGGER = "flwr"


def app_error(exc: BaseException | None) -> BaseException | None:
    """The app error `exc` is or was raised from (through `__cause__`/`__context__`)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, APP_ERRORS):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class OneLineAppErrors(logging.Filter):
    """Rewrites a log record carrying an app error to `error: <message>`, without traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite `record` in place when its exception is an app error; keep every record."""
        error = app_error(record.exc_info[1] if record.exc_info else None)
        if error is not None:
            record.msg, record.args = "error: %s", (error,)
            record.exc_info, record.exc_text = None, None
        return True


def report_app_errors_in_one_line(logger_name: str = FLOWER_LOGGER) -> None:
    """Install `OneLineAppErrors` on the named logger (Flower's), once per process."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, OneLineAppErrors) for f in logger.filters):
        logger.addFilter(OneLineAppErrors())
