"""What a run records: history.json and history.csv every round, the final model, the
plots and the history's summary at the end; and the run's callbacks (the console progress,
TensorBoard when `tensorboard` is on, and any given by the caller), called as it goes."""

from __future__ import annotations

import copy
import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

import keras
import numpy as np
from flwr.common import Parameters, parameters_to_ndarrays
from flwr.common.logger import log

from fl_app.data.types import Split
from fl_app.ml.trainer import KerasTrainer
from fl_app.schema import LayerSettings, RunConfig
from fl_app.server.callbacks import Callback
from fl_app.server.checkpoint import Checkpoint
from fl_app.server.outputs import (
    ENCRYPTED_MODEL_FILE,
    MODEL_FILE,
    atomic_write_bytes,
    private_files,
    save_plots,
    write_history,
)
from fl_app.server.progress import ConsoleProgress
from fl_app.server.round_log import write_csv_log
from fl_app.server.run_clock import run_start
from fl_app.server.run_summary import run_summary
from fl_app.server.statistics import StatisticsRound
from fl_app.server.tensorboard import LOG_DIR, TensorBoardLogger
from strategies.homomorphic import is_encrypted


@dataclass(frozen=True)
class RecordSettings(LayerSettings):
    """The keys that shape what a run shows and records besides its history."""

    verbose: bool
    tensorboard: bool
    num_server_rounds: int
    strategy: str
    dataset: str


def live_console(verbose: bool) -> bool:
    """Whether the progress is a live bar: on a terminal, and not drowned out by `verbose`."""
    from rich.console import Console

    return Console().is_terminal and not verbose


def plot_context(settings: RecordSettings, rounds: list[dict[str, Any]]) -> str:
    """The run in a few words for plot titles: strategy, dataset, clients per round."""
    sampled = max((r.get("fit", {}).get("num_sampled", 0) for r in rounds), default=0)
    parts = [settings.strategy, Path(settings.dataset).name]
    if sampled:
        parts.append(f"{sampled} clients/round")
    return " · ".join(parts)


class RunRecorder:
    """Keeps the run's history; writes history.json and history.csv each round, model,
    plots and summary at the end; calls the callbacks.

    `started_at` (seconds since the epoch; default: `run_start()`) is where the run's
    start-up and total time are counted from. With the server's `test_set` and
    single-label classes, the summary also holds the final model's recall per class on it
    (`class_recall`, by class index) and the lowest (`worst_class_recall`). With
    `statistics` (`standardize=true`) `final_model.keras` holds the model between its
    Normalization and Rescaling layers: raw inputs in, raw-scale outputs out. `exporter`,
    when given, writes more copies of a plaintext final model into the output folder and
    returns what to record of them in the summary under `export` (`fl_app.server.export`).
    """

    def __init__(self, cfg: RunConfig, out_dir: Path, trainer: KerasTrainer,
                 callbacks: Sequence[Callback] = (), started_at: float | None = None,
                 test_set: Split | None = None, statistics: StatisticsRound | None = None,
                 exporter: Callable[[Path], dict[str, Any]] | None = None) -> None:
        self.settings = RecordSettings.from_config(cfg)
        self.out_dir = out_dir
        self.trainer = trainer
        self.test_set = test_set
        self.statistics = statistics
        self.history: dict[str, Any] = {"config": dict(cfg), "rounds": [], "stopped": None}
        self.started_at = run_start() if started_at is None else started_at
        self.startup_seconds: float | None = None
        self.exporter = exporter
        tensorboard = [TensorBoardLogger(out_dir / LOG_DIR)] if self.settings.tensorboard else []
        self.callbacks: list[Callback] = [
            ConsoleProgress(self.settings.num_server_rounds,
                            live=live_console(self.settings.verbose)),
            *tensorboard, *callbacks]

    def resume(self, checkpoint: Checkpoint) -> None:
        """Continue the history saved in `checkpoint` (later rounds on disk are dropped)."""
        saved = {k: v for k, v in checkpoint.history.items() if k != "summary"}
        self.history = {**saved, "config": self.history["config"], "stopped": None,
                        "resumed_after": [*saved.get("resumed_after", []), checkpoint.round]}
        write_history(self.out_dir, self.history)

    def on_round(self, record: dict[str, Any], parameters: Parameters) -> None:
        """Append a round's record, persist the history and its CSV log, call the callbacks
        (the first record also ends the start-up: `on_run_begin`)."""
        self.history["rounds"].append(record)
        write_history(self.out_dir, self.history)
        write_csv_log(self.out_dir, self.history["rounds"])
        if self.startup_seconds is None:
            self.startup_seconds = time.time() - self.started_at - float(record["seconds"])
            for callback in self.callbacks:
                callback.on_run_begin(dict(self.history["config"]), self.startup_seconds)
        for callback in self.callbacks:
            callback.on_round_end(int(record["round"]), copy.deepcopy(record))

    def _class_recall(self, model: keras.Model) -> dict[str, Any]:
        """The final `model`'s recall per class on the test set, and the worst (none
        without a test set or single-label classes)."""
        if self.test_set is None or self.trainer.spec.task not in ("multiclass", "binary"):
            return {}
        recall = self.trainer.class_recall(self.test_set, model)
        return {"class_recall": recall, "worst_class_recall": min(recall.values())}

    def _export(self) -> dict[str, Any]:
        """The exporter's record; a failure is logged and recorded, not raised: the run's
        model, plots and history are still written (the preflight check makes it rare)."""
        assert self.exporter is not None
        try:
            return self.exporter(self.out_dir)
        except Exception as err:  # noqa: BLE001  (Keras and the converter raise many kinds)
            log(ERROR, "error: export-int8 failed after training: %s: %s",
                type(err).__name__, err)
            return {"error": f"{type(err).__name__}: {err}"}

    def on_finish(self, stopped: str, parameters: Parameters) -> None:
        """Record why the run stopped and its summary; save the final model and the plots;
        call the callbacks' `on_run_end`.

        An encrypted aggregate (homomorphic encryption) is saved as it is, in
        `final_model.ckks.npz` (arrays `chunk_0`, ...), for a key holder to decrypt
        (`python -m fl_app.cli.he_final`): the server cannot write `final_model.keras`."""
        encrypted = is_encrypted(parameters)
        model = self.trainer.model
        if not encrypted:
            self.trainer.set_weights(parameters_to_ndarrays(parameters))
            if self.statistics is not None:  # raw inputs in, raw-scale outputs out
                model = self.statistics.final_model(model, self.trainer.spec.input_shape)
        self.history["stopped"] = stopped
        self.history["summary"] = {
            **run_summary(self.history, startup_seconds=self.startup_seconds,
                          total_seconds=time.time() - self.started_at,
                          directions=self.trainer.metric_directions()),
            **({} if encrypted else self._class_recall(model))}
        write_history(self.out_dir, self.history)
        if encrypted:
            buffer = io.BytesIO()
            # (Typed Any: numpy's stub matches a ** mapping of arrays against a bool.)
            chunks: dict[str, Any] = {f"chunk_{i}": a for i, a in
                                      enumerate(parameters_to_ndarrays(parameters))}
            np.savez(buffer, **chunks)
            atomic_write_bytes(self.out_dir / ENCRYPTED_MODEL_FILE, buffer.getvalue())
        else:
            with private_files():
                model.save(self.out_dir / MODEL_FILE)
            if self.exporter is not None:
                self.history["summary"]["export"] = self._export()
                write_history(self.out_dir, self.history)
        rounds = self.history["rounds"]
        save_plots(self.out_dir, rounds, plot_context(self.settings, rounds))
        log(INFO, "results written to %s", self.out_dir)
        for callback in self.callbacks:
            callback.on_run_end(copy.deepcopy(self.history))
