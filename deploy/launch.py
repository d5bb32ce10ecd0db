"""Launch a whole deployment on this machine: 1 SuperLink + N SuperNodes, then `flwr run`.

    python -m deploy.launch --dir DIR [--num-nodes N [--partitioner NAME]]
        [--run-config "k=v ..."] [--out OUT] [--timeout SECONDS]
        [--clientapps executor|flower] [--task-timeout SECONDS] [--verbose]

DIR is a folder made by `python -m deploy.prepare` (with `--num-nodes` it is prepared
first if it holds no deployment yet) that holds every node's private key: a one-machine
trial. A folder prepared with `--node-public-keys` (each node holds its own private key)
is refused before anything starts, naming a node whose key it lacks. Every process is a
separate Flower process on 127.0.0.1 with TLS and SuperNode authentication on, on free ports: the
SuperLink, one SuperNode per node (its own key and data file; `--isolation process`) with its
executor next to it (`fl_app.worker.executor`: it takes the node's tasks with the node's SuperExec
secret, DIR/executors/<node>/secret, and runs them in one warm ClientApp process, so
TensorFlow, the data and the model stay loaded across messages; `--clientapps flower`:
Flower's own SuperExec instead, a fresh process per message), and the `flwr` CLI that
registers the nodes' public keys, submits the run (`flwr run . <connection>` from the
project folder) and streams its log (the ServerApp's progress lines only; `--verbose`: also
the SuperLink's, SuperNodes' and executors' output and Flower's own INFO lines). The run
config adds `fuse-evaluate=true` (one message per round; not under `server-loop='fedbuff'`)
unless `--run-config` sets it. The results (history.json, final_model.keras, plots) land in OUT
(default DIR/results); the logs of every process in DIR/launch/logs. Every file written
is mode 600 and every folder mode 700 (the processes run with umask 077), and the
SuperLink keeps its state in memory, so the messages it relays (the clients' model
updates) are never written to disk. A DIR inside the project should be git-ignored (like
runs/), or its .json files travel with the app bundle. Every process started here, and
the ones Flower starts under them, is stopped by pid at the end, also on Ctrl-C, SIGTERM
or failure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from deploy import commands, files
from deploy.commands import Command
from deploy.layout import Deployment, DeploymentError, NodeFiles
from deploy.processes import Echo, Managed, Supervisor
from fl_app.data.node_files import load_node_file
from fl_app.data.sources import DataError, data_spec
from fl_app.data.types import DataSettings
from fl_app.schema import ConfigError
from fl_app.server.outputs import HISTORY_FILE
from fl_app.server.stopping import IDLE_STOP

COMPLETED = "finished:completed"
CLI_TIMEOUT = 120.0
ADDRESS_IN_USE = "address already in use"  # how uvicorn and Python's OSError say it


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended: its id, Flower's final status, and the history it wrote."""

    run_id: int
    status: str
    out_dir: Path
    history: dict[str, Any] | None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listens(proc: psutil.Process, port: int) -> bool:
    """Whether `proc` itself holds a TCP socket listening on `port`."""
    try:
        sockets = proc.net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(sock.status == psutil.CONN_LISTEN and sock.laddr and sock.laddr.port == port
               for sock in sockets)


def wait_listening(managed: Managed, port: int, timeout: float) -> None:
    """Wait until `managed`'s process listens on `port` (so it, not some other process,
    accepts connections there); raise `DeploymentError` if it exits or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while not listens(managed.process, port):
        code = managed.poll()
        if code is not None:
            raise DeploymentError(f"{managed.name} exited with code {code} before listening "
                                  f"on port {port}; see {managed.log_path}")
        if time.monotonic() > deadline:
            raise DeploymentError(f"{managed.name} did not listen on port {port} within "
                                  f"{timeout:.0f} s; see {managed.log_path}")
        time.sleep(0.2)


def _lost_its_port(managed: Managed) -> bool:
    """Whether `managed` exited because another process took its port first."""
    return managed.poll() is not None and ADDRESS_IN_USE in managed.log_text().lower()


def start_listening(sup: Supervisor, name: str, command: Callable[[int], Command],
                    echo: bool = True, timeout: float = 60.0,
                    attempts: int = 3) -> tuple[Managed, int]:
    """Start `command(port)` on a free `port` of 127.0.0.1; return it and the port once it
    listens there.

    `free_port` finds a port that was free a moment ago: if the process exits because
    another one took the port in between, it starts again on a fresh port (at most
    `attempts` starts in all).
    """
    attempt = 1
    while True:
        port = free_port()
        managed = sup.start(name, command(port), echo=echo)
        try:
            wait_listening(managed, port, timeout)
            return managed, port
        except DeploymentError:
            if attempt >= attempts or not _lost_its_port(managed):
                raise
        attempt += 1


def _json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in `text`, or None."""
    start = text.find("{")
    if start < 0:
        return None
    try:
        data, _ = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def cli_json(managed: Managed) -> dict[str, Any]:
    """The JSON document a `flwr ... --format json` command printed on its standard output
    (its log lines on standard error are not read); errors name the command and carry
    Flower's error message, or else the command's log."""
    data = _json_object(managed.text())
    code = managed.poll()
    if code == 0 and data is not None and data.get("success", True):
        return data
    detail = (data or {}).get("error-message") or managed.log_text().strip()[-2000:]
    raise DeploymentError(f"`{managed.name}` failed (exit code {code}): {detail}")


def check_project(project_dir: Path) -> None:
    """Refuse a project whose pyproject.toml flwr 1.41 would rewrite on `flwr run .`.

    flwr >= 1.41 moves a legacy `[tool.flwr.federations]` table into $FLWR_HOME/config.toml
    and comments it out in pyproject.toml, which must not happen to a checked-out project.
    """
    path = project_dir / "pyproject.toml"
    if not path.is_file():
        raise DeploymentError(f"{path} not found: --project must be the app's folder")
    flwr = tomllib.loads(path.read_text(encoding="utf-8")).get("tool", {}).get("flwr", {})
    if "federations" in flwr:
        raise DeploymentError(f"{path} has a [tool.flwr.federations] table, which flwr >= 1.41 "
                              "migrates (rewriting pyproject.toml) on `flwr run`: move it to "
                              "$FLWR_HOME/config.toml as [superlink.<name>] connections")


class LocalDeployment:
    """The processes of one deployment on 127.0.0.1, started through a `Supervisor`.

    `state_dir` holds what only this launch needs: the CLI's connection (with the port
    picked now) and one FLWR_HOME per component, as if each ran on its own machine. With
    `echo_components` off only the run's log is echoed (every log is still written). The
    SuperNodes accept the prepared model and dataset and those of `run_configs` (the
    overrides of the runs this launch will start; `deploy.commands.node_config`).
    """

    def __init__(self, dep: Deployment, supervisor: Supervisor, state_dir: Path,
                 echo_components: bool = True, clientapps: str = "executor",
                 project_dir: Path | None = None, run_configs: Sequence[str] = (),
                 task_timeout: float | None = None) -> None:
        self.dep = dep
        self.run_configs = tuple(run_configs)
        self.clientapps = clientapps
        self.task_timeout = task_timeout
        self.executors: dict[str, Managed] = {}
        self.project_dir = project_dir or Path(__file__).resolve().parents[1]
        self.echo_components = echo_components
        self.sup = supervisor
        self.cli_home = state_dir / "flwr-home"
        self.homes = state_dir / "homes"
        self.port: int | None = None
        self.superlink: Managed | None = None
        self.node_ids: dict[str, int] = {}
        self.required: dict[str, Managed] = {}

    @property
    def address(self) -> str:
        """The SuperLink's address (after `start_superlink`)."""
        if self.port is None:
            raise DeploymentError("the SuperLink has not been started")
        return f"127.0.0.1:{self.port}"

    def start_superlink(self, timeout: float = 60.0) -> Managed:
        """Start the SuperLink on a free port and wait until it listens there."""
        def command(port: int) -> Command:
            return commands.superlink(self.dep, self.homes / "superlink", "127.0.0.1", port)

        self.superlink, self.port = start_listening(self.sup, "superlink", command,
                                                    echo=self.echo_components, timeout=timeout)
        self.required["superlink"] = self.superlink
        commands.write_connection(self.cli_home, self.address, self.dep.ca_cert)
        return self.superlink

    def register(self, node: NodeFiles) -> int:
        """Register `node`'s public key with the SuperLink; return the node id it got."""
        managed = self.sup.run(f"register-{node.name}",
                               commands.register(self.dep, node, self.cli_home), CLI_TIMEOUT)
        node_id = int(cli_json(managed)["node-id"])
        self.node_ids[node.name] = node_id
        return node_id

    def start_node(self, node: NodeFiles, required: bool = True) -> Managed:
        """Start `node`'s SuperNode (and, with the executor, the node's secret first and its
        executor next to it, which exits with it); a `required` one that exits fails the
        run."""
        runtime_port = free_port()
        if self.clientapps == "executor":
            from fl_app.worker.secret_file import ensure_secret

            ensure_secret(commands.executor_secret(self.dep, node))
        cmd = commands.supernode(self.dep, node, self.homes / node.name, self.address,
                                 runtime_port, clientapps=self.clientapps,
                                 run_configs=self.run_configs)
        managed = self.sup.start(node.name, cmd, echo=self.echo_components)
        if required:
            self.required[node.name] = managed
        if self.clientapps == "executor":
            self.start_executor(node, managed.pid, runtime_port)
        return managed

    def start_executor(self, node: NodeFiles, parent_pid: int, runtime_port: int) -> Managed:
        """Start `node`'s executor on its SuperNode's Runtime API (it waits for the API
        to come up, and exits when `parent_pid`, the SuperNode, does)."""
        cmd = commands.executor(self.dep, node, self.homes / f"{node.name}-executor",
                                runtime_port, parent_pid, python=sys.executable,
                                task_timeout=self.task_timeout)
        managed = self.sup.start(f"{node.name}-executor", cmd, cwd=self.project_dir,
                                 echo=self.echo_components)
        self.executors[node.name] = managed
        return managed

    def check_running(self) -> None:
        """Raise if the SuperLink or a required SuperNode has exited."""
        for name, managed in self.required.items():
            code = managed.poll()
            if code is not None:
                raise DeploymentError(f"{name} exited with code {code}; see {managed.log_path}")

    def run_config(self, out_dir: Path, extra: str = "") -> list[str]:
        """The run's `--run-config`s, later ones overriding earlier ones: wait for every
        node, one message per round (`fuse-evaluate=true`, but under FedBuff), the prepared
        keys, `extra`, and `out-dir`."""
        return [f"min-available-clients={len(self.dep.nodes)}",
                commands.fused_run_config(self.dep.run_config, extra),
                commands.he_run_config(self.dep), self.dep.run_config, extra,
                f"out-dir={commands.config_string(str(out_dir))}"]

    def run_app(self, project_dir: Path, run_configs: list[str], timeout: float) -> RunOutcome:
        """`flwr run . <connection>` from `project_dir`, stream its log until it ends.

        A log stream that breaks (`flwr log` fails) raises `DeploymentError`: how the run
        ended is then unknown, which is not the same as a failed run.
        """
        check_project(project_dir)
        started = self.sup.run("flwr-run", commands.run_app(self.cli_home, run_configs,
                                                            stream=False),
                               CLI_TIMEOUT, cwd=project_dir)
        run_id = int(cli_json(started)["run-id"])
        logs = self.sup.start("run", commands.stream_logs(self.cli_home, run_id))
        deadline = time.monotonic() + timeout
        while logs.poll() is None:
            self.check_running()
            if time.monotonic() > deadline:
                raise DeploymentError(f"run {run_id} did not finish within {timeout:.0f} s")
            time.sleep(0.5)
        if logs.poll() != 0:
            raise DeploymentError(f"streaming the log of run {run_id} failed (`flwr log` exit "
                                  f"code {logs.poll()}), so how the run ended is unknown: "
                                  f"see {logs.log_path}")
        listed = self.sup.run("flwr-list", commands.list_run(self.cli_home, run_id), CLI_TIMEOUT)
        status = str(cli_json(listed)["runs"][0]["status"])
        out_dir = Path(run_config_value(run_configs, "out-dir"))
        history_path = out_dir / HISTORY_FILE
        history = (json.loads(history_path.read_text(encoding="utf-8"))
                   if history_path.is_file() else None)
        return RunOutcome(run_id, status, out_dir, history)


def run_config_value(run_configs: list[str], key: str) -> Any:
    """One key of `--run-config` strings, parsed as Flower parses them."""
    from fl_app.flower_internals import parse_config_args

    return parse_config_args([rc for rc in run_configs if rc])[key]


def describe_failures(history: dict[str, Any], node_ids: dict[str, int]) -> list[str]:
    """One line per failed client and round, naming the failed node by its deployment name."""
    names = {str(node_id): f"{name} (node id {node_id})" for name, node_id in node_ids.items()}
    lines = []
    for record in history.get("rounds", []):
        for failure in record.get("fit", {}).get("failures", []):
            node = names.get(failure["client"], f"node {failure['client']}")
            lines.append(f"round {record['round']}: {node} failed: {failure['error']}")
    return lines


def check_private_keys(dep: Deployment) -> None:
    """Raise `DeploymentError` naming the first node whose private key is not in the folder
    (every SuperNode starts on this machine and signs with its key), or the first CKKS key
    file missing under homomorphic encryption."""
    for node in dep.nodes:
        if node.key is None:
            raise DeploymentError(
                f"{node.name}'s private key is held by the node itself ({dep.root} was "
                "prepared with --node-public-keys), and deploy.launch starts every SuperNode "
                "on this machine: start each node's SuperNode on its own machine with the "
                "commands deploy.prepare printed, or prepare a one-machine trial folder "
                "without --node-public-keys")
        if not node.key.is_file():
            raise DeploymentError(f"{node.name}'s private key {node.key} not found: prepare "
                                  f"{dep.root} again (--force)")
    he_files = [dep.he_public_context, *map(dep.he_key, dep.nodes)]
    for path in he_files if dep.he_key_held_by is not None else []:
        if not path.is_file():
            raise DeploymentError(f"{path} not found: the nodes' CKKS keys are made with "
                                  "`python -m deploy.he_key` (step 0 of the commands "
                                  "deploy.prepare printed) before the run")


def check_node_data(dep: Deployment, project_dir: Path, run_config: str = "") -> None:
    """Raise `DataError` naming the node and its file when a node's data file is missing,
    unreadable or does not fit the run's data (its inputs, classes, data-quality checks):
    every node's file is read before anything starts, not in round 1."""
    from fl_app.cli.simulate import load_run_config

    cfg = load_run_config(" ".join(part for part in (dep.run_config, run_config) if part),
                          project_dir)
    spec = data_spec(DataSettings.from_config(cfg))
    for node in dep.nodes:
        try:
            load_node_file(str(node.data), spec, DataSettings.from_config(cfg))
        except DataError as err:
            raise DataError(f"{node.name}: {err}") from err


def launch(dep: Deployment, project_dir: Path, out_dir: Path, run_config: str = "",
           timeout: float = 1800.0, echo: Echo | None = print,
           echo_nodes: bool = False, clientapps: str = "executor",
           task_timeout: float | None = None) -> tuple[RunOutcome, dict[str, int]]:
    """Start the SuperLink and every SuperNode, run the app, stop everything.

    Refuses (before starting anything) a folder without every node's private key or with a
    node data file that cannot be used. Returns the run's outcome and the node id each node
    was registered under.
    """
    check_private_keys(dep)
    check_node_data(dep, project_dir, run_config)
    log_dir = dep.root / "launch" / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    files.private_dir(log_dir.parent)  # the Supervisor makes log_dir itself, mode 700
    say = echo or (lambda line: None)
    # The components' FLWR_HOMEs (where the app bundle gets unpacked) live outside DIR, so a
    # DIR inside the project never ends up in the next run's bundle.
    with (tempfile.TemporaryDirectory(prefix="fl-deploy-") as state_dir,
          Supervisor(log_dir, echo=echo) as sup):
        local = LocalDeployment(dep, sup, Path(state_dir), echo_components=echo_nodes,
                                clientapps=clientapps, project_dir=project_dir,
                                run_configs=(run_config,), task_timeout=task_timeout)
        local.start_superlink()
        say(f"SuperLink on https://{local.address} (logs in {sup.log_dir})")
        for node in dep.nodes:
            say(f"registered {node.name} as node {local.register(node)}")
        for node in dep.nodes:
            local.start_node(node)
        outcome = local.run_app(project_dir, local.run_config(out_dir.resolve(), run_config),
                                timeout)
        return outcome, dict(local.node_ids)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, required=True, help="deployment folder")
    parser.add_argument("--num-nodes", type=int, default=None,
                        help="prepare DIR for this many SuperNodes if it is not prepared yet")
    parser.add_argument("--partitioner", default=None, help="partitioner when preparing DIR")
    parser.add_argument("--run-config", default="", help="extra run-config overrides")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default DIR/results)")
    parser.add_argument("--project", type=Path, default=None,
                        help="the Flower app's folder (default: this repository)")
    parser.add_argument("--timeout", type=float, default=1800.0,
                        help="seconds the run may take (default 1800)")
    parser.add_argument("--clientapps", choices=commands.CLIENTAPPS, default="executor",
                        help="who runs the ClientApps: this app's executor, one warm process "
                             "per node (default), or Flower's SuperExec, a fresh process per "
                             "message")
    parser.add_argument("--task-timeout", type=float, default=None,
                        help="seconds the executor lets a ClientApp take for one message "
                             "(default 600)")
    parser.add_argument("--verbose", action="store_true",
                        help="also stream the SuperLink's, SuperNodes' and executors' logs, and "
                             "Flower's own lines in the run's log (verbose=true)")
    return parser.parse_args(argv)


def _load_or_prepare(args: argparse.Namespace) -> Deployment:
    from deploy.layout import MANIFEST
    from deploy.prepare import prepare, run_config_with

    if args.num_nodes is None or (args.dir / MANIFEST).is_file():
        dep = Deployment.load(args.dir)
        if args.num_nodes is not None and args.num_nodes != len(dep.nodes):
            raise DeploymentError(f"{args.dir} is prepared for {len(dep.nodes)} nodes, not "
                                  f"{args.num_nodes}: use another --dir")
        return dep
    return prepare(args.dir, args.num_nodes, run_config_with("", args.partitioner),
                   ["127.0.0.1", "localhost"])


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Launch, run, print the outcome; exit code 0 only if the run completed."""
    from fl_app.cli.simulate import PROJECT_DIR

    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    try:
        dep = _load_or_prepare(args)
        out_dir = args.out or dep.root / "results"
        start = time.perf_counter()
        run_config = f"{args.run_config} verbose=true" if args.verbose else args.run_config
        outcome, node_ids = launch(dep, (args.project or PROJECT_DIR).resolve(), out_dir,
                                   run_config, args.timeout, echo_nodes=args.verbose,
                                   clientapps=args.clientapps, task_timeout=args.task_timeout)
        seconds = time.perf_counter() - start
    except (DeploymentError, ConfigError, DataError) as err:
        print(f"error: {_with_notes(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # survivors, if any, are in its notes
        print(f"interrupted: {_with_notes(err) or 'every process was stopped'}", file=sys.stderr)
        return 130
    return report(outcome, node_ids, seconds)


def report(outcome: RunOutcome, node_ids: dict[str, int], seconds: float) -> int:
    """Print how the run ended, its failed nodes and its summary table; return the exit
    code: 0 only if the run completed and trained."""
    from fl_app.cli.summary import print_summary

    print(f"run {outcome.run_id}: {outcome.status}")
    if outcome.history is None:
        print(f"error: the run wrote no {HISTORY_FILE} to {outcome.out_dir}", file=sys.stderr)
        return 1
    for line in describe_failures(outcome.history, node_ids):
        print(line)
    if print_summary(outcome.out_dir, seconds) == IDLE_STOP:
        print("error: no client update made it into the model in max-idle-rounds rounds in a "
              "row; the failures are listed above", file=sys.stderr)
        return 1
    return 0 if outcome.status == COMPLETED else 1


def _with_notes(err: BaseException) -> str:
    """The error's message followed by any notes added while it propagated."""
    return "; ".join([str(err), *getattr(err, "__notes__", [])]).strip("; ")


if __name__ == "__main__":
    sys.exit(main())
