"""The app's own errors as one `error:` line in Flower's log, not a traceback.

When a ServerApp raises, Flower's runtime (`flwr-simulation` under `flwr run .`,
`flwr-serverapp` in a deployment) logs "ServerApp/Simulation raised an exception" with the
whole traceback: some forty lines of Flower's own frames around one line that matters. The
app's errors (`ConfigError`, `ModelError`, `DataError`) already name the key, file or client
and the fix, so `OneLineAppErrors`, a filter on Flower's logger, rewrites such a record to
`error: <message>` and drops the traceback. Any other exception keeps its traceback: it is a
bug, and the frames are what one needs to fix it. Flower still ends the run as
`finished:failed` with the message in its details (`flwr ls --run-id N`).
"""

from __future__ import annotations

import logging

from fl_app.data.types import DataError
from fl_app.ml.errors import ModelError
from fl_app.schema import ConfigError

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
