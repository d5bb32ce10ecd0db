"""What a run records: one log line and one history.json record per round, the final
model and the plots at the end."""

from __future__ import annotations

import io
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import Parameters, parameters_to_ndarrays
from flwr.common.logger import log

from fl_app.ml.trainer import KerasTrainer
from fl_app.schema import RunConfig
from fl_app.server.checkpoint import Checkpoint
from fl_app.server.outputs import (
    ENCRYPTED_MODEL_FILE,
    MODEL_FILE,
    atomic_write_bytes,
    metric_names,
    private_files,
    save_plots,
    write_history,
)
from strategies.homomorphic import is_encrypted


def progress_line(record: dict[str, Any]) -> str:
    """One human-readable line per round."""
    parts = [f"round {record['round']:>3}"]
    fit = record.get("fit")
    if fit:
        parts.append(f"clients {fit['num_clients']} ({fit['num_failures']} failed, "
                     f"{fit['num_rejected']} rejected)")
    cen = record.get("centralized", {})
    if cen:
        parts.append("  ".join(f"{name} {cen[name]:.4f}"
                               for name in metric_names([record], "centralized")))
    if "privacy" in record:
        parts.append(f"ε {record['privacy']['epsilon']:.3f}")
    parts.append(f"{record['seconds']:.2f} s")
    return " | ".join(parts)


class RunRecorder:
    """Keeps the run's history; writes history.json each round, model and plots at the end."""

    def __init__(self, cfg: RunConfig, out_dir: Path, trainer: KerasTrainer) -> None:
        self.out_dir = out_dir
        self.trainer = trainer
        self.history: dict[str, Any] = {"config": dict(cfg), "rounds": [], "stopped": None}

    def resume(self, checkpoint: Checkpoint) -> None:
        """Continue the history saved in `checkpoint` (later rounds on disk are dropped)."""
        saved = checkpoint.history
        self.history = {**saved, "config": self.history["config"], "stopped": None,
                        "resumed_after": [*saved.get("resumed_after", []), checkpoint.round]}
        write_history(self.out_dir, self.history)

    def on_round(self, record: dict[str, Any], parameters: Parameters) -> None:
        """Append a round's record, log it and persist the history."""
        self.history["rounds"].append(record)
        log(INFO, "%s", progress_line(record))
        write_history(self.out_dir, self.history)

    def on_finish(self, stopped: str, parameters: Parameters) -> None:
        """Record why the run stopped; save the final model and the plots.

        An encrypted aggregate (homomorphic encryption) is saved as it is, in
        `final_model.ckks.npz` (arrays `chunk_0`, ...), for a key holder to decrypt
        (`python -m fl_app.app.he_final`): the server cannot write `final_model.keras`."""
        self.history["stopped"] = stopped
        write_history(self.out_dir, self.history)
        if is_encrypted(parameters):
            buffer = io.BytesIO()
            np.savez(buffer, **{f"chunk_{i}": a for i, a in
                                enumerate(parameters_to_ndarrays(parameters))})
            atomic_write_bytes(self.out_dir / ENCRYPTED_MODEL_FILE, buffer.getvalue())
        else:
            self.trainer.set_weights(parameters_to_ndarrays(parameters))
            with private_files():
                self.trainer.model.save(self.out_dir / MODEL_FILE)
        save_plots(self.out_dir, self.history["rounds"])
        log(INFO, "results written to %s", self.out_dir)
