"""The Flower ServerApp: model, strategy, centralized evaluation, stopping and results."""

from __future__ import annotations

from logging import INFO
from pathlib import Path
from typing import Any

from flwr.common import (
    Context,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.logger import log
from flwr.server import ServerAppComponents, ServerConfig
from flwr.serverapp import ServerApp

from fl_app.checkpoint import Checkpoint, Checkpointer, load_for_resume
from fl_app.client_app import round_config
from fl_app.config import RunConfig, resolve
from fl_app.data import Split, data_source
from fl_app.models import build_model
from fl_app.outputs import MODEL_FILE, resolve_out_dir, save_plots, write_history
from fl_app.runner import FederatedServer, ResumePoint, StoppingRules
from fl_app.trainer import KerasTrainer, trainer_for
from strategies.context import StrategyContext
from strategies.registry import build_strategy
from strategies.weighted_fedavg import EvaluateFn


def centralized_evaluator(trainer: KerasTrainer, test: Split) -> EvaluateFn:
    """Flower `evaluate_fn`: loss and accuracy of the global model on the server's test set."""

    def evaluate(server_round: int, arrays: NDArrays,
                 config: dict[str, Scalar]) -> tuple[float, dict[str, Scalar]]:
        trainer.set_weights(arrays)
        loss, accuracy = trainer.evaluate(test)
        return loss, {"accuracy": accuracy}

    return evaluate


def progress_line(record: dict[str, Any]) -> str:
    """One human-readable line per round."""
    parts = [f"round {record['round']:>3}"]
    fit = record.get("fit")
    if fit:
        parts.append(f"clients {fit['num_clients']} ({fit['num_failures']} failed, "
                     f"{fit['num_rejected']} rejected)")
    cen = record.get("centralized", {})
    if "accuracy" in cen:
        parts.append(f"accuracy {cen['accuracy']:.4f}  loss {cen['loss']:.4f}")
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
        """Record why the run stopped; save the final model and the plots."""
        self.history["stopped"] = stopped
        write_history(self.out_dir, self.history)
        self.trainer.set_weights(parameters_to_ndarrays(parameters))
        self.trainer.model.save(self.out_dir / MODEL_FILE)
        save_plots(self.out_dir, self.history["rounds"])
        log(INFO, "results written to %s", self.out_dir)


def server_components(cfg: RunConfig) -> ServerAppComponents:
    """Build everything the server needs for one run from a resolved config."""
    source = data_source(cfg)
    trainer = trainer_for(cfg, source.spec)
    # A fresh seeded model, not the process-wide trainer's weights: those are whatever the
    # previous run in this process (tests, benchmark scripts) evaluated last.
    initial_weights = build_model(str(cfg["model"]), source.spec, int(cfg["seed"])).get_weights()
    checkpoint = load_for_resume(cfg, initial_weights)
    out_dir = resolve_out_dir(str(cfg["out-dir"] or cfg["resume-from"]))
    recorder = RunRecorder(cfg, out_dir, trainer)
    resume = None
    if checkpoint is not None:
        recorder.resume(checkpoint)
        resume = ResumePoint(checkpoint.round, ndarrays_to_parameters(checkpoint.weights),
                             checkpoint.server_state)
    ctx = StrategyContext(
        cfg=cfg,
        initial_parameters=ndarrays_to_parameters(initial_weights),
        evaluate_fn=centralized_evaluator(trainer, source.test_set()),
        on_fit_config_fn=lambda server_round: round_config(cfg, server_round),
        on_evaluate_config_fn=lambda server_round: {"server-round": server_round},
    )
    server = FederatedServer(
        strategy=build_strategy(ctx), seed=int(cfg["seed"]),
        stopping=StoppingRules(cfg["target-accuracy"], cfg["patience"], cfg["max-idle-rounds"]),
        on_round=recorder.on_round, on_finish=recorder.on_finish,
        on_checkpoint=Checkpointer(cfg, out_dir, lambda: recorder.history), resume=resume,
    )
    timeout = cfg["round-timeout"] or None
    return ServerAppComponents(server=server, config=ServerConfig(
        num_rounds=int(cfg["num-server-rounds"]), round_timeout=timeout))


def make_server_app(fixed_config: RunConfig | None = None) -> ServerApp:
    """A ServerApp; with `fixed_config` it ignores `context.run_config` (for run_simulation)."""

    def server_fn(context: Context) -> ServerAppComponents:
        cfg = fixed_config if fixed_config is not None else resolve(context.run_config)
        return server_components(cfg)

    return ServerApp(server_fn=server_fn)


app = make_server_app()
