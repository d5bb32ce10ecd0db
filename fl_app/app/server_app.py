"""The Flower ServerApp: model, strategy, centralized evaluation, stopping and results."""

from __future__ import annotations

from collections.abc import Sequence

from flwr.common import Context, NDArrays, Scalar, ndarrays_to_parameters
from flwr.server import ServerAppComponents, ServerConfig
from flwr.server.compat import start_grid
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from fl_app.app.config import resolve
from fl_app.app.one_line_errors import report_app_errors_in_one_line
from fl_app.app.preflight import checked_trainer, monitored_names
from fl_app.app.quiet import quiet_libraries
from fl_app.data.sources import Split, data_source
from fl_app.ml.models import build_model
from fl_app.ml.trainer import KerasTrainer
from fl_app.schema import RunConfig
from fl_app.server.callbacks import Callback
from fl_app.server.checkpoint import Checkpointer, load_for_resume, read_ledger
from fl_app.server.outputs import resolve_out_dir
from fl_app.server.prompt_grid import PromptGrid
from fl_app.server.recorder import RunRecorder
from fl_app.server.runner import FederatedServer, ResumePoint
from fl_app.server.secagg import SecAggPlusFit
from fl_app.server.stopping import StoppingRules
from fl_app.wire import evaluate_config, round_config
from strategies.context import StrategyContext
from strategies.registry import build_strategy
from strategies.secure import share_count
from strategies.weighted_fedavg import EvaluateFn


def centralized_evaluator(trainer: KerasTrainer, test: Split) -> EvaluateFn:
    """Flower `evaluate_fn`: loss and compiled metrics of the global model on the server's
    test set."""

    def evaluate(server_round: int, arrays: NDArrays,
                 config: dict[str, Scalar]) -> tuple[float, dict[str, Scalar]]:
        trainer.set_weights(arrays)
        loss, metrics = trainer.evaluate(test)
        return loss, dict(metrics)

    return evaluate


def server_components(cfg: RunConfig, callbacks: Sequence[Callback] = (),
                      started_at: float | None = None) -> ServerAppComponents:
    """Build everything the server needs for one run from a resolved config (`callbacks`
    and `started_at`: see `RunRecorder`)."""
    trainer = checked_trainer(cfg)
    source = data_source(cfg)
    # A fresh seeded model, not the process-wide trainer's weights: those are whatever the
    # previous run in this process (tests, benchmark scripts) evaluated last.
    initial_weights = build_model(str(cfg["model"]), source.spec, int(cfg["seed"])).get_weights()
    checkpoint = load_for_resume(cfg, initial_weights)
    out_dir = resolve_out_dir(str(cfg["out-dir"] or cfg["resume-from"]))
    recorder = RunRecorder(cfg, out_dir, trainer, callbacks, started_at)
    resume = None
    if checkpoint is not None:
        recorder.resume(checkpoint)
        resume = ResumePoint(checkpoint.round, ndarrays_to_parameters(checkpoint.weights),
                             checkpoint.server_state, read_ledger(str(cfg["resume-from"])))
    ctx = StrategyContext(
        cfg=cfg,
        initial_parameters=ndarrays_to_parameters(initial_weights),
        evaluate_fn=centralized_evaluator(trainer, source.test_set()),
        on_fit_config_fn=lambda server_round: round_config(cfg, server_round),
        on_evaluate_config_fn=evaluate_config,
    )
    checkpointer = Checkpointer(cfg, out_dir, lambda: recorder.history)
    server = FederatedServer(
        strategy=build_strategy(ctx), seed=int(cfg["seed"]),
        stopping=StoppingRules(
            str(cfg["monitor"]), str(cfg["mode"]), patience=int(cfg["patience"]),
            min_delta=float(cfg["min-delta"]), target=float(cfg["target"]),
            max_idle_rounds=int(cfg["max-idle-rounds"]), metric_names=monitored_names(trainer),
            directions=trainer.metric_directions()),
        on_round=recorder.on_round, on_finish=recorder.on_finish,
        on_checkpoint=checkpointer, on_charge=checkpointer.save_ledger, resume=resume,
    )
    timeout = cfg["round-timeout"] or None
    return ServerAppComponents(server=server, config=ServerConfig(
        num_rounds=int(cfg["num-server-rounds"]), round_timeout=timeout))


def secagg_workflow(cfg: RunConfig) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ fit workflow with the run's share, threshold and range settings
    (modulus 2^32, the largest Flower allows). Under distributed DP every client reports
    one example (`strategies.distributed_dp`), so the max weight is 1."""
    return SecAggPlusWorkflow(
        num_shares=share_count(float(cfg["secagg-num-shares"])),
        reconstruction_threshold=share_count(float(cfg["secagg-reconstruction-threshold"])),
        max_weight=(1.0 if cfg["strategy"] == "dp-client-fixed"
                    else float(cfg["secagg-max-weight"])),
        clipping_range=float(cfg["secagg-clipping-range"]),
        quantization_range=int(cfg["secagg-quantization-range"]),
        timeout=float(cfg["round-timeout"]) or None)


def serve(grid: Grid, context: Context, cfg: RunConfig,
          components: ServerAppComponents | None = None) -> None:
    """Run the app's server loop (`server_components(cfg)` unless given) over `grid`; with
    `secure-aggregation=secagg+` every fit round runs Flower's SecAgg+ workflow."""
    components = components if components is not None else server_components(cfg)
    server = components.server
    if cfg["secure-aggregation"] == "secagg+" and isinstance(server, FederatedServer):
        # The workflow talks to the grid itself: poll it as promptly as the proxies do.
        server.secure_fit = SecAggPlusFit(secagg_workflow(cfg), PromptGrid(grid), context)
    start_grid(grid=grid, server=server, config=components.config)


def make_server_app(fixed_config: RunConfig | None = None, callbacks: Sequence[Callback] = (),
                    started_at: float | None = None) -> ServerApp:
    """A ServerApp; with `fixed_config` it ignores `context.run_config` (for run_simulation),
    and calls `callbacks` as the run goes (see `fl_app.server.callbacks`). A config, model
    or data error it raises is logged by Flower as one `error:` line."""
    report_app_errors_in_one_line()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        raw = fixed_config if fixed_config is not None else context.run_config
        quiet_libraries(raw.get("verbose") is True)  # resolving imports TensorFlow
        cfg = fixed_config if fixed_config is not None else resolve(raw)
        serve(grid, context, cfg, server_components(cfg, callbacks, started_at))

    return app


app = make_server_app()
