"""A console that shows the run, not its libraries: unless `verbose`, TensorFlow's start-up
lines, absl and Ray logging, deprecation warnings and Flower's per-call INFO lines
(`configure_fit`, `aggregate_*`, the `[SUMMARY]` dump, deprecation notices) are kept off.
Warnings and errors still show.

TensorFlow (2.21) writes its oneDNN notice through absl's C++ logging while its library
loads, before `TF_CPP_MIN_LOG_LEVEL` or any Python logger can act, so it is loaded with
the process's standard error (file descriptor 2) pointed at the null device
(`import_tensorflow_quietly`). Every entry point (run_simulation, the ServerApp, the
ClientApp) calls `quiet_libraries` before anything imports TensorFlow.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

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
