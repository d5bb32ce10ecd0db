"""The Flower ServerApp: model, strategy (or FedBuff), centralized evaluation, stopping and
results."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from flwr.common import Context, NDArrays, Scalar, ndarrays_to_parameters
from flwr.server import ServerAppComponents, ServerConfig
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid, ServerApp

from fl_app.app.config import resolve
from fl_app.app.logs import quiet_libraries, report_app_errors_in_one_line
from fl_app.app.preflight import checked_trainer, monitored_names
from fl_app.data.sources import Split, data_source
from fl_app.data.types import DataSettings
from fl_app.flower_internals import start_grid
from fl_app.ml.models import build_model
from fl_app.ml.trainer import KerasTrainer
from fl_app.schema import RunConfig
from fl_app.server.callbacks import Callback
from fl_app.server.checkpoint import (
    Checkpoint,
    Checkpointer,
    load_for_resume,
    read_ledger,
)
from fl_app.server.export import export_int8
from fl_app.server.fedbuff_loop import FedBuffServer
from fl_app.server.outputs import resolve_out_dir
from fl_app.server.recorder import RunRecorder
from fl_app.server.runner import FederatedServer, ResumePoint
from fl_app.server.secagg import SecAggPlusFit
from fl_app.server.statistics import StatisticsRound
from fl_app.server.stopping import StoppingRules
from fl_app.wire import (
    CLIENT_SAMPLING,
    KEY_FUSE_EVALUATE,
    KEY_PROXIMAL_MU,
    evaluate_config,
    round_config,
)
from strategies.compose import compose
from strategies.context import StrategyContext
from strategies.fedbuff import FEDBUFF, FedBuffAggregator
from strategies.registry import evaluates_distributed
from strategies.secure import share_count
from strategies.weighted_fedavg import EvaluateFn


def centralized_evaluator(trainer: KerasTrainer, test: Split,
                          statistics: StatisticsRound | None = None) -> EvaluateFn:
    """Flower `evaluate_fn`: loss and compiled metrics of the global model on the server's
    test set (standardized with the pooled `statistics` when the run has them)."""

    def evaluate(server_round: int, arrays: NDArrays,
                 config: dict[str, Scalar]) -> tuple[float, dict[str, Scalar]]:
        trainer.set_weights(arrays)
        standardization = statistics.standardization if statistics is not None else None
        loss, metrics = trainer.evaluate(test, standardization)
        return loss, dict(metrics)

    return evaluate


@dataclass
class RunParts:
    """What both server loops build from a resolved config."""

    initial_weights: NDArrays
    evaluate: EvaluateFn
    recorder: RunRecorder
    checkpointer: Checkpointer
    stopping: StoppingRules
    checkpoint: Checkpoint | None
    statistics: StatisticsRound | None


def run_parts(cfg: RunConfig, callbacks: Sequence[Callback] = (),
              started_at: float | None = None) -> RunParts:
    """The model, centralized evaluation, recorder, checkpointer and stopping rules of a
    run, with the recorder resumed when `resume-from` names a checkpoint (`callbacks` and
    `started_at`: see `RunRecorder`), and with `standardize=true` its statistics round."""
    trainer = checked_trainer(cfg)
    source = data_source(DataSettings.from_config(cfg))
    statistics = (StatisticsRound(source.spec, float(cfg["examples-cap-factor"]),
                                  int(cfg["max-examples"]), int(cfg["min-fit-clients"]))
                  if cfg["standardize"] else None)
    # A fresh seeded model, not the process-wide trainer's weights: those are whatever the
    # previous run in this process (tests, benchmark scripts) evaluated last.
    initial_weights = build_model(str(cfg["model"]), source.spec, int(cfg["seed"])).get_weights()
    checkpoint = load_for_resume(cfg, initial_weights)
    out_dir = resolve_out_dir(str(cfg["out-dir"] or cfg["resume-from"]))
    test_set = source.test_set()
    exporter = partial(export_int8, trainer, test_set) if cfg["export-int8"] else None
    recorder = RunRecorder(cfg, out_dir, trainer, callbacks, started_at, test_set,
                           statistics, exporter)
    if checkpoint is not None:
        recorder.resume(checkpoint)
    stopping = StoppingRules(
        str(cfg["monitor"]), str(cfg["mode"]), patience=int(cfg["patience"]),
        min_delta=float(cfg["min-delta"]), target=float(cfg["target"]),
        max_idle_rounds=int(cfg["max-idle-rounds"]), metric_names=monitored_names(trainer),
        directions=trainer.metric_directions())
    return RunParts(initial_weights, centralized_evaluator(trainer, test_set, statistics),
                    recorder, Checkpointer(cfg, out_dir, lambda: recorder.history), stopping,
                    checkpoint, statistics)


def fuses_evaluation(cfg: RunConfig) -> bool:
    """Whether the run's fit messages carry its distributed evaluation (`fuse-evaluate`,
    unless the run has none: `strategies.registry.evaluates_distributed`)."""
    return bool(cfg["fuse-evaluate"]) and evaluates_distributed(cfg)


def extra_config(statistics: StatisticsRound | None) -> Callable[[], dict[str, Scalar]]:
    """What every fit and evaluate config adds: the pooled statistics (`standardize`)."""
    return statistics.config if statistics is not None else dict


def fit_config(cfg: RunConfig, statistics: StatisticsRound | None = None
               ) -> Callable[[int], dict[str, Scalar]]:
    """The fit config of each round: `round_config`, `fuse-evaluate` when it is on and the
    pooled statistics under `standardize`."""
    fused = {KEY_FUSE_EVALUATE: True} if fuses_evaluation(cfg) else {}
    extra = extra_config(statistics)
    return lambda server_round: {**round_config(cfg, server_round), **fused, **extra()}


def server_components(cfg: RunConfig, callbacks: Sequence[Callback] = (),
                      started_at: float | None = None) -> ServerAppComponents:
    """Build everything the synchronous server needs for one run from a resolved config."""
    parts = run_parts(cfg, callbacks, started_at)
    checkpoint, recorder, checkpointer = parts.checkpoint, parts.recorder, parts.checkpointer
    resume = None
    if checkpoint is not None:
        resume = ResumePoint(checkpoint.round, ndarrays_to_parameters(checkpoint.weights),
                             checkpoint.server_state, read_ledger(str(cfg["resume-from"])))
    ctx = StrategyContext(
        cfg=cfg,
        initial_parameters=ndarrays_to_parameters(parts.initial_weights),
        evaluate_fn=parts.evaluate,
        on_fit_config_fn=fit_config(cfg, parts.statistics),
        on_evaluate_config_fn=lambda server_round: {**evaluate_config(server_round),
                                                    **extra_config(parts.statistics)()},
    )
    server = FederatedServer(
        strategy=compose(ctx), seed=int(cfg["seed"]), stopping=parts.stopping,
        on_round=recorder.on_round, on_finish=recorder.on_finish,
        on_checkpoint=checkpointer, on_charge=checkpointer.save_ledger, resume=resume,
        fuse_evaluate=fuses_evaluation(cfg), statistics=parts.statistics,
        directions=recorder.trainer.metric_directions(),
        sample_by_size=cfg[CLIENT_SAMPLING] == "size",
        size_claims=(float(cfg["examples-cap-factor"]), int(cfg["max-examples"])),
    )
    timeout = float(cfg["round-timeout"]) or None
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
        server.secure_fit = SecAggPlusFit(secagg_workflow(cfg), grid, context,
                                          min_clients=int(cfg["secagg-min-clients"]))
    start_grid(grid=grid, server=server, config=components.config)


def fedbuff_fit_config(cfg: RunConfig) -> Callable[[int], dict[str, Scalar]]:
    """The fit config sent with a model version: the round keys, plus FedProx's mu."""
    extra = {KEY_PROXIMAL_MU: float(cfg["proximal-mu"])} if cfg["strategy"] == "fedprox" else {}
    return lambda version: {**round_config(cfg, version), **extra}


def fedbuff_server(cfg: RunConfig, callbacks: Sequence[Callback] = (),
                   started_at: float | None = None) -> FedBuffServer:
    """The FedBuff server for one run (see `fl_app.server.fedbuff_loop`)."""
    parts = run_parts(cfg, callbacks, started_at)
    checkpoint = parts.checkpoint
    aggregator = FedBuffAggregator(
        parts.initial_weights if checkpoint is None else checkpoint.weights,
        buffer_size=int(cfg["fedbuff-buffer-size"]),
        max_staleness=int(cfg["fedbuff-max-staleness"]),
        server_lr=float(cfg["fedbuff-server-lr"]),
        staleness_exponent=float(cfg["fedbuff-staleness-exponent"]),
        max_examples=int(cfg["max-examples"]),
        examples_cap_factor=float(cfg["examples-cap-factor"]),
        version=0 if checkpoint is None else checkpoint.round)
    resume = None if checkpoint is None else ResumePoint(
        checkpoint.round, ndarrays_to_parameters(checkpoint.weights), checkpoint.server_state)
    return FedBuffServer(
        aggregator=aggregator, evaluate=lambda version, arrays: parts.evaluate(version, arrays, {}),
        fit_config=fedbuff_fit_config(cfg), stopping=parts.stopping,
        on_round=parts.recorder.on_round, on_finish=parts.recorder.on_finish,
        on_checkpoint=parts.checkpointer, num_versions=int(cfg["num-server-rounds"]),
        concurrency=int(cfg["fedbuff-concurrency"]),
        min_available=int(cfg["min-available-clients"]), seed=int(cfg["seed"]),
        timeout=float(cfg["round-timeout"]) or None, resume=resume)


def make_server_app(fixed_config: RunConfig | None = None, callbacks: Sequence[Callback] = (),
                    started_at: float | None = None) -> ServerApp:
    """A ServerApp; with `fixed_config` it ignores `context.run_config` (for run_simulation),
    and calls `callbacks` as the run goes (see `fl_app.server.callbacks`). A config, model
    or data error it raises is logged by Flower as one `error:` line.

    `server-loop` picks the loop: Flower's synchronous `Server` (our `FederatedServer`,
    run as Flower runs a `server_fn`'s components) or the FedBuff loop on the Grid.
    """
    report_app_errors_in_one_line()
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        raw = fixed_config if fixed_config is not None else context.run_config
        quiet_libraries(raw.get("verbose") is True)  # resolving imports TensorFlow
        cfg = fixed_config if fixed_config is not None else resolve(raw)
        if cfg["server-loop"] == FEDBUFF:
            fedbuff_server(cfg, callbacks, started_at).run(grid)
            return
        serve(grid, context, cfg, server_components(cfg, callbacks, started_at))

    return app


app = make_server_app()
