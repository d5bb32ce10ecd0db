"""`run_simulation.py`: run the app in-process on Flower's simulation engine.

    python run_simulation.py [--num-supernodes 10] [--run-config "k=v k2=v2"] [--out DIR]
    python run_simulation.py --resume DIR [--run-config "num-server-rounds=40"]
    python run_simulation.py --check [--run-config "k=v"]   # config, model and data only

`--run-config` takes the same syntax as `flwr run . --run-config` and is resolved through
the same schema on top of pyproject.toml's `[tool.flwr.app.config]`, so both entry
points run with the same config; the config is also checked against `--num-supernodes`
before Flower starts. `--resume DIR` continues an interrupted run after its last complete
round, with the config saved in DIR's checkpoint (overrides may change only
`max-epsilon`, `num-server-rounds` and `round-timeout`; `--out` writes the continuation
to another folder).

Without `--ray-address` the simulation starts its own Ray, private to this machine and
account (`simulation_ray`): every Ray process listens on 127.0.0.1 only, no dashboard, and
Ray's temporary folder (sockets, logs with the clients' output) is a fresh 0700 folder,
removed after the run. `--ray-address` joins an existing cluster as it is configured.

The console shows one progress display (a bar on a terminal, a line per round elsewhere)
and a summary table; `--verbose` (or `verbose=true`) brings back TensorFlow's, Ray's and
Flower's own logs.

With `homomorphic-encryption=ckks` (and no `he-public-context`) it makes a fresh CKKS key in
a private temporary folder, gives the server the public context (`he-public-context`) and
every simulated node the secret key file (node config `he-key-file`, which the server never
receives), decrypts the encrypted final aggregate into `final_model.keras` as a node would
(`fl_app.cli.he_final`), and removes the keys. With your own keys: set `he-public-context`
and pass the nodes' key file with `--he-key-file`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fl_app.app.config import check_num_clients, resolve
from fl_app.app.logs import quiet_libraries
from fl_app.cli.summary import print_summary
from fl_app.data.sources import DataError
from fl_app.flower_internals import flatten_dict, get_project_config, parse_config_args
from fl_app.ml.errors import ModelError
from fl_app.schema import ConfigError, RunConfig
from fl_app.server.callbacks import Callback
from fl_app.server.checkpoint import RESUMABLE_CHANGES, CheckpointError, load_checkpoint
from fl_app.server.outputs import resolve_out_dir
from fl_app.server.run_clock import run_start
from fl_app.server.stopping import IDLE_STOP

if TYPE_CHECKING:
    from fl_app.flower_internals import Mod

PROJECT_DIR = Path(__file__).resolve().parents[2]  # the folder of pyproject.toml
# What `--run-config` may change with `--resume`: `--resume` sets resume-from and the
# output folder is `--out`'s (out-dir stays resumable for `flwr run`'s resume-from).
RESUME_OVERRIDES = RESUMABLE_CHANGES - {"out-dir", "resume-from"}


def parse_overrides(overrides: str | None) -> dict[str, Any]:
    """`--run-config`'s key=value pairs (as `flwr run` parses them); ConfigError if malformed."""
    try:
        return parse_config_args([overrides] if overrides else None)
    except (click.ClickException, OSError, ValueError) as err:
        raise ConfigError(f"--run-config {overrides!r} cannot be parsed: {err}") from err


def load_run_config(overrides: str | None, project_dir: Path = PROJECT_DIR) -> RunConfig:
    """pyproject.toml's app config with `--run-config` overrides, validated by the schema."""
    app_config = get_project_config(project_dir)["tool"]["flwr"]["app"].get("config", {})
    raw = flatten_dict(app_config)
    raw.update(parse_overrides(overrides))
    return resolve(raw)


def resume_run_config(folder: str, overrides: str | None) -> RunConfig:
    """The config saved in `folder`'s checkpoint, with `--run-config` overrides, resuming it."""
    raw = dict(load_checkpoint(folder).config)
    changes = parse_overrides(overrides)
    fixed = sorted(set(changes) - RESUME_OVERRIDES)
    if fixed:
        hint = "; use --out DIR to write the continuation elsewhere" if "out-dir" in fixed else ""
        raise CheckpointError(f"--resume continues the run with its saved config; only "
                              f"{', '.join(sorted(RESUME_OVERRIDES))} may change, not "
                              f"{', '.join(repr(k) for k in fixed)}{hint}")
    raw.update(changes)
    raw["resume-from"] = str(Path(folder).expanduser().resolve())
    return resolve(raw)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="run_simulation.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-supernodes", type=int, default=10,
                        help="number of simulated clients (default: 10)")
    parser.add_argument("--run-config", default=None,
                        help='run-config overrides, e.g. "strategy=\'fedprox\' local-epochs=2"')
    parser.add_argument("--out", default=None,
                        help="output folder (default: out-dir, else outputs/<timestamp>)")
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="continue the interrupted run in DIR after its last complete round "
                             "(writes to DIR unless --out is given)")
    parser.add_argument("--num-cpus-per-client", type=float, default=1.0,
                        help="CPUs reserved per simulated client (default: 1)")
    parser.add_argument("--num-gpus-per-client", type=float, default=0.0,
                        help="GPUs reserved per simulated client (default: 0)")
    parser.add_argument("--ray-address", default=None,
                        help="address of an existing Ray cluster to run the clients on (its "
                             "own settings apply: who can reach it is its operator's choice); "
                             "without it the run starts a private Ray on 127.0.0.1")
    parser.add_argument("--check", action="store_true",
                        help="check the config, model and data, train nothing: one `error:` "
                             "line (exit 2) or `ok` (e.g. to see which key `flwr run` "
                             "rejected as `Invalid run configuration`)")

    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's, Ray's and Flower's own logs (as verbose=true)")
    parser.add_argument("--he-key-file", default=None, metavar="FILE",
                        help="homomorphic-encryption=ckks with your own he-public-context: the "
                             "nodes' secret key file (default: a fresh key for this run)")
    args = parser.parse_args(argv)
    if args.num_supernodes < 1:
        parser.error("--num-supernodes must be at least 1")
    return args


def backend_config(args: argparse.Namespace, verbose: bool = False) -> dict:
    """Ray backend settings: resources per client, an optional cluster address, and (unless
    `verbose`) Ray's own logging and the workers' output kept off the console."""
    init_args: dict = {} if verbose else {"log_to_driver": False, "logging_level": "ERROR"}
    if args.ray_address:
        init_args["address"] = args.ray_address
    return {"client_resources": {"num_cpus": args.num_cpus_per_client,
                                 "num_gpus": args.num_gpus_per_client},
            "init_args": init_args}


def checked_config(args: argparse.Namespace) -> RunConfig:
    """The run's config (new or resumed), checked against `--num-supernodes`, its model
    checked against its data."""
    if args.resume:
        cfg = resume_run_config(args.resume, args.run_config)
    else:
        cfg = load_run_config(args.run_config)
    if args.verbose:
        cfg = cfg.replace(verbose=True)
    elif cfg["verbose"]:  # verbose=true in --run-config: Flower's lines back on
        quiet_libraries(True)
    check_num_clients(cfg, args.num_supernodes)
    check_user_keys(cfg, args.he_key_file)
    from fl_app.app.preflight import checked_trainer  # imports TensorFlow

    checked_trainer(cfg)  # the model fits the data: one `error:` line, before Flower starts
    return cfg


BOTH_HALVES = ("homomorphic-encryption=ckks with your own keys needs both run-config key "
               "he-public-context and --he-key-file")


def check_user_keys(cfg: RunConfig, key_file: str | None) -> None:
    """Refuse `--he-key-file` without homomorphic encryption, and the user's own keys unless
    both halves are given and make one key pair."""
    if cfg["homomorphic-encryption"] == "none":
        if key_file:
            raise ConfigError("--he-key-file is set but run-config key homomorphic-encryption "
                              "is 'none': set homomorphic-encryption='ckks' or drop the file")
        return
    if not (cfg["he-public-context"] or key_file):
        return  # run_simulation.py makes a fresh pair
    if not (cfg["he-public-context"] and key_file):
        raise ConfigError(BOTH_HALVES)
    from fl_app.protocol.ckks import check_key_pair

    check_key_pair(str(cfg["he-public-context"]), key_file)


def prepare(args: argparse.Namespace) -> RunConfig:
    """`checked_config` with the output folder filled in."""
    cfg = checked_config(args)
    out_dir = resolve_out_dir(args.out or args.resume or str(cfg["out-dir"]))
    return cfg.replace(out_dir=str(out_dir))


@contextmanager
def encryption_keys(cfg: RunConfig, key_file: str | None) -> Iterator[tuple[RunConfig, str]]:
    """The run's config and the nodes' key file under `homomorphic-encryption=ckks`: the
    user's (`he-public-context` and `--he-key-file`), or a fresh pair in a private
    temporary folder (0700, files 0600) removed when the run is over."""
    if cfg["he-public-context"] or key_file:  # a pair, as `check_user_keys` checked
        if not (cfg["he-public-context"] and key_file):  # (a caller that skipped it)
            raise ConfigError(BOTH_HALVES)
        yield cfg, key_file
        return
    from fl_app.protocol import ckks

    with tempfile.TemporaryDirectory(prefix="fl-he-") as folder:  # mode 0700
        public = Path(folder) / ckks.PUBLIC_CONTEXT_FILE
        secret = Path(folder) / ckks.SECRET_CONTEXT_FILE
        ckks.write_key_pair(public, secret)
        yield cfg.replace(he_public_context=str(public)), str(secret)


LOOPBACK = "127.0.0.1"
# Ray's switch for a loopback-only node (on Linux it otherwise turns a loopback
# `_node_ip_address` into the machine's address, and its servers listen on every interface).
RAY_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# The longest parent folder for Ray's private temp folder: Ray's Unix sockets lie about 85
# characters below it (`fl-ray-XXXXXXXX/ray/session_<date>_<pid>/sockets/plasma_store`),
# and a socket's path must stay under 108 bytes.
MAX_TEMP_PARENT = 20


def ray_runtime_env(preload_tenseal: bool) -> dict[str, Any]:
    """The Ray workers' runtime env: this process's import path (as Flower's own start gives
    them) and, for homomorphic encryption, TenSEAL loaded before Flower's Ray actor imports
    TensorFlow (see `fl_app/__init__.py`)."""
    path = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    env: dict[str, Any] = {"env_vars": {"PYTHONPATH": path}}
    if preload_tenseal:
        env["worker_process_setup_hook"] = "fl_app.preload_tenseal"
    return env


@contextmanager
def loopback_only_ray() -> Iterator[None]:
    """Ray told to keep a node on 127.0.0.1 (`RAY_CLUSTER_ENV`=0, in this process, read by
    Ray when it resolves the node's address, and in the environment its processes inherit);
    both restored afterwards."""
    from ray._private import ray_constants

    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):  # a private name: check it is there
        import ray

        raise RuntimeError(f"Ray {ray.__version__} has no ray._private.ray_constants."
                           "ENABLE_RAY_CLUSTER, which keeps the simulation's Ray on "
                           "127.0.0.1: not started; use a Ray version that has it")
    saved_env, saved = os.environ.get(RAY_CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_CLUSTER_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
        if saved_env is None:
            os.environ.pop(RAY_CLUSTER_ENV, None)
        else:
            os.environ[RAY_CLUSTER_ENV] = saved_env


def ray_temp_parent() -> str:
    """Where the private Ray folder goes: the system's temp folder when its path leaves room
    for Ray's Unix sockets, else /tmp."""
    parent = tempfile.gettempdir()
    return parent if len(parent) <= MAX_TEMP_PARENT else "/tmp"


@contextmanager
def simulation_ray(args: argparse.Namespace, verbose: bool,
                   preload_tenseal: bool = False) -> Iterator[None]:
    """Ray, started here (and stopped afterwards) so that Flower's simulation uses it as it
    is (`ray_runtime_env` for the workers).

    With `--ray-address` it joins that cluster, as Flower would. Otherwise the Ray it starts
    is this machine's and this account's alone: every Ray process listens on 127.0.0.1 only
    (`loopback_only_ray`), there is no dashboard, and Ray's temporary folder (its sockets,
    and logs holding the clients' output) lies in a fresh private folder (0700; Ray's
    processes inherit umask 077, so their files are the account's alone; Ray makes its own
    folders 0777 from every process, which the 0700 folder above them keeps closed), removed
    when the run is over."""
    import ray

    if ray.is_initialized():  # a Ray of this process's: Flower will use it as it is
        yield
        return
    init_args = {**backend_config(args, verbose)["init_args"], "include_dashboard": False,
                 "runtime_env": ray_runtime_env(preload_tenseal)}
    with ExitStack() as stack:
        folder = None if args.ray_address else stack.enter_context(tempfile.TemporaryDirectory(
            prefix="fl-ray-", dir=ray_temp_parent(), ignore_cleanup_errors=True))
        if folder is not None:
            stack.enter_context(loopback_only_ray())
            init_args.update(_node_ip_address=LOOPBACK, _temp_dir=os.path.join(folder, "ray"))
        umask = os.umask(0o077)  # Ray's processes, and so every file they write, inherit it
        try:
            ray.init(**init_args)
        finally:
            os.umask(umask)
        stack.callback(ray.shutdown)
        yield


def simulate(cfg: RunConfig, args: argparse.Namespace, callbacks: Sequence[Callback] = (),
             started_at: float | None = None, outer_mods: Sequence[Mod] = ()) -> float:
    """Run the ServerApp and `--num-supernodes` ClientApps on Flower's simulation engine
    (`callbacks`, `started_at`: see `fl_app.server.recorder.RunRecorder`; `outer_mods`:
    see `make_client_app`); return the run's wall time in seconds (with homomorphic
    encryption: including the decryption of the final model)."""
    from flwr.simulation import run_simulation

    from fl_app.app.client_app import make_client_app
    from fl_app.app.server_app import make_server_app

    start = time.perf_counter()
    verbose = bool(cfg["verbose"])
    backend = backend_config(args, verbose)
    if cfg["homomorphic-encryption"] == "none":
        with simulation_ray(args, verbose):
            run_simulation(server_app=make_server_app(cfg, callbacks, started_at),
                           client_app=make_client_app(cfg, outer_mods=outer_mods),
                           num_supernodes=args.num_supernodes,
                           backend_config=backend)
        return time.perf_counter() - start
    from fl_app.cli.he_final import decrypt_final_model
    from fl_app.protocol.ckks import KEY_FILE_NODE_CONFIG
    from fl_app.server.outputs import ENCRYPTED_MODEL_FILE, MODEL_FILE

    keys = encryption_keys(cfg, args.he_key_file)
    with keys as (run_cfg, key_file), simulation_ray(args, verbose, preload_tenseal=True):
        client_app = make_client_app(run_cfg, node_config={KEY_FILE_NODE_CONFIG: key_file},
                                     outer_mods=outer_mods)
        run_simulation(server_app=make_server_app(run_cfg, callbacks, started_at),
                       client_app=client_app, num_supernodes=args.num_supernodes,
                       backend_config=backend)
        out_dir = Path(str(cfg["out-dir"]))
        if (out_dir / ENCRYPTED_MODEL_FILE).is_file():
            decrypt_final_model(run_cfg, key_file, out_dir / ENCRYPTED_MODEL_FILE,
                                out_dir / MODEL_FILE)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Resolve and check the config, run the simulation, print the summary."""
    started_at = run_start(command=argv is None)  # before the model check and Ray's start
    args = parse_args(argv)
    quiet_libraries(args.verbose)  # before the config's model check imports TensorFlow
    try:
        if args.check:
            checked_config(args)
            print(f"ok: the config, model and data fit {args.num_supernodes} clients")
            return 0
        cfg = prepare(args)
        seconds = simulate(cfg, args, started_at=started_at)
    except (ConfigError, DataError, ModelError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(str(cfg["out-dir"]))
    if not (out_dir / "history.json").is_file():
        print(f"error: the run wrote no history to {out_dir}; see the log above", file=sys.stderr)
        return 1
    stopped = print_summary(out_dir, seconds)
    if stopped == IDLE_STOP:
        print(f"error: no client update was accepted in {cfg['max-idle-rounds']} rounds in a "
              "row; the failures are in history.json (fit.failures)", file=sys.stderr)
        return 1
    return 0
