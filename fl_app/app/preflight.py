"""Checks a run makes before any training: the model fits the data, `rebalance` fits its
task, and the stopping rules watch a metric the model records.

`run_simulation.py` calls `check_run` before Flower starts, so a model or data problem is
one `error:` line; the ServerApp builds the same trainer (cached per process), so the
checks and the run cannot disagree.
"""

from __future__ import annotations

from fl_app.data.rebalance import check_rebalance
from fl_app.data.sources import data_source
from fl_app.data.types import DataSettings
from fl_app.ml.export import check_exportable
from fl_app.ml.trainer import KerasTrainer, TrainSettings, trainer_for
from fl_app.schema import RunConfig
from fl_app.server.stopping import check_monitor


def checked_trainer(cfg: RunConfig) -> KerasTrainer:
    """The run's trainer, built and checked against the server's data (loaded here, once per
    process); raises ModelError, DataError or ConfigError (naming the model, file or key)
    when the run cannot train (a `rebalance` the data's task cannot take included) or, with
    `export-int8`, cannot make its int8 copies."""
    spec = data_source(DataSettings.from_config(cfg)).spec
    check_rebalance(str(cfg["rebalance"]), spec)
    trainer = trainer_for(TrainSettings.from_config(cfg), spec)
    check_monitor(str(cfg["monitor"]), monitored_names(trainer))
    if cfg["export-int8"]:
        check_exportable(trainer.model)
    return trainer


def monitored_names(trainer: KerasTrainer) -> set[str]:
    """What centralized evaluation records, so what `monitor` may name."""
    return {"loss", *trainer.metric_names()}
