"""TensorBoard event files for a run (`tensorboard=true`): every round's scalars
(`fl_app.server.round_log.round_scalars`: centralized and distributed metrics, the clients'
training metrics and counts, ε, bytes, seconds) at step = round, in <out-dir>/tensorboard.

    tensorboard --logdir outputs/main/tensorboard

Written with `tf.summary` (TensorBoard's summary ops, installed by the `tensorboard`
extra); the files are created 0600 in a 0700 folder like the run's other outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fl_app.server.callbacks import Callback
from fl_app.server.outputs import private_files
from fl_app.server.round_log import round_scalars

LOG_DIR = "tensorboard"


class TensorBoardLogger(Callback):
    """Writes each round's scalars to TensorBoard event files under `log_dir`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._writer: Any = None

    def _file_writer(self) -> Any:
        import tensorflow as tf

        if self._writer is None:
            self.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        return self._writer

    def on_round_end(self, server_round: int, record: dict[str, Any]) -> None:
        """Write the round's scalars at step `server_round` and flush them to disk."""
        import tensorflow as tf

        with private_files():
            writer = self._file_writer()
            with writer.as_default(step=server_round):
                for tag, value in round_scalars(record).items():
                    tf.summary.scalar(tag, value)
            writer.flush()

    def on_run_end(self, history: dict[str, Any]) -> None:
        """Close the event file."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
