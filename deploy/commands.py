"""The Flower command lines of a deployment, built once for `prepare` to print and `launch` to run.

Every component gets its own FLWR_HOME (where Flower installs the app bundle it receives),
as it would on its own machine, and runs with umask 077: whatever Flower writes (FLWR_HOME,
the run's results, logs) is private to the account that runs it. The SuperLink keeps its
state in memory (Flower's default): no `--database`, so the messages it relays (the
clients' model updates) never go to disk.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w

from deploy.files import PRIVATE_UMASK, private_dir, write_private
from deploy.layout import CONNECTION, Deployment, DeploymentError, NodeFiles
from fl_app.client.node_policy import KEY_ALLOW_DATA, KEY_ALLOW_MODELS, KEY_CLIENT_KEY
from fl_app.wire import KEY_FUSE_EVALUATE

TASK_POLL_INTERVAL = 0.1  # seconds between a SuperExec's looks for a message to run


@dataclass(frozen=True)
class Command:
    """A command line, the environment variables it needs on top of the caller's, and the
    umask it runs with (None: the caller's)."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    umask: int | None = PRIVATE_UMASK

    def shell(self, cwd: Path | None = None) -> str:
        """The command as one line to paste into a POSIX shell (`umask 077 && ...`: the
        terminal's shell keeps that umask afterwards)."""
        env = [f"{key}={shlex.quote(value)}" for key, value in self.env.items()]
        steps = [" ".join([*env, shlex.join(self.argv)])]
        if self.umask is not None:
            steps.insert(0, f"umask {self.umask:03o}")
        if cwd is not None:
            steps.insert(0, f"cd {shlex.quote(str(cwd))}")
        return " && ".join(steps)


def superlink(dep: Deployment, home: Path, bind_host: str, port: int) -> Command:
    """`flower-superlink` with TLS, SuperNode authentication, and no dependency installs.

    Its state stays in memory (no `--database`): the messages it relays, the clients'
    model updates among them, never reach the disk, and the registered SuperNode keys last
    as long as the process (register the nodes after it starts, again after a restart).
    """
    argv = ["flower-superlink",
            "--ssl-ca-certfile", str(dep.ca_cert),
            "--ssl-certfile", str(dep.server_cert),
            "--ssl-keyfile", str(dep.server_key),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", bind_host, "--port", str(port)]
    return Command(argv, {"FLWR_HOME": str(home),
                          "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(TASK_POLL_INTERVAL)})


CLIENTAPPS = ("executor", "flower")
"""Who runs a node's ClientApps: this app's executor (`fl_app.worker.executor`: one warm
process, the SuperNode started with `--isolation process`), or Flower's default SuperExec
(a fresh `flwr-clientapp` process per message)."""


def executor_secret(dep: Deployment, node: NodeFiles) -> Path:
    """`node`'s SuperExec secret file: `DIR/executors/<node>/secret` (mode 600, folder 700);
    its SuperNode and its executor both read it."""
    return dep.root / "executors" / node.name / "secret"


def executor(dep: Deployment, node: NodeFiles, home: Path, runtime_port: int,
             parent_pid: int | None = None, python: str = "python",
             task_timeout: float | None = None) -> Command:
    """`python -m fl_app.worker.executor` for `node`: takes its SuperNode's tasks on
    127.0.0.1:`runtime_port`, signed with the node's secret, and runs them in one warm
    ClientApp process (the FABs it installs go to `home`, its FLWR_HOME); it exits when
    `parent_pid` (the SuperNode) does."""
    argv = [python, "-m", "fl_app.worker.executor", "--runtime-api", f"127.0.0.1:{runtime_port}",
            "--secret-file", str(executor_secret(dep, node)), "--name", node.name]
    if parent_pid:
        argv += ["--parent-pid", str(parent_pid)]
    if task_timeout is not None:
        argv += ["--task-timeout", f"{task_timeout:g}"]
    return Command(argv, {"FLWR_HOME": str(home)})


def new_secret(dep: Deployment, node: NodeFiles, python: str = "python") -> Command:
    """`python -m fl_app.worker.executor --new-secret`: make `node`'s secret file if missing."""
    return Command([python, "-m", "fl_app.worker.executor", "--new-secret", "--secret-file",
                    str(executor_secret(dep, node))])


def supernode(dep: Deployment, node: NodeFiles, home: Path, superlink_address: str,
              runtime_port: int, private_key: str | None = None,
              clientapps: str = "executor", run_configs: Sequence[str] = ()) -> Command:
    """`flower-supernode` for `node`: verifies the SuperLink's TLS certificate, signs with
    its private key, and reads its own data file (node-config `data-path`).

    The private key is `private_key` when given (a path on the node's own machine), else
    the one in the folder; a node that holds its own key has none there
    (`DeploymentError` naming it). Its local Runtime API (for the ClientApp processes it
    starts) binds 127.0.0.1:`runtime_port`. Runtime installation of dependencies stays off
    (the SuperNode default). With `clientapps="executor"` it runs with `--isolation
    process` and `--superexec-auth-secret-file` (the node's `executor_secret`): it launches
    nothing itself, and only a process holding the secret, the node's `executor`, takes its
    tasks. With `clientapps="flower"` its own SuperExec starts a `flwr-clientapp` process per
    message, looking for one every `TASK_POLL_INTERVAL` seconds
    (`FLWR_SUPEREXEC_TASK_POLL_INTERVAL`; Flower's default, 1 s, is added to every message a
    node answers). Its node config lets it accept
    only the prepared model and dataset, or those of `run_configs` (see `node_config`).
    """
    if private_key is None and node.key is None:
        raise DeploymentError(f"{node.name}'s private key is held by the node itself, not "
                              f"in {dep.root}: its SuperNode can only start on its own machine")
    argv = ["flower-supernode",
            "--superlink", superlink_address,
            "--root-certificates", str(dep.ca_cert),
            "--auth-supernode-private-key", private_key or str(node.key),
            "--node-config", node_config(dep, node, run_configs),
            "--host", "127.0.0.1", "--port", str(runtime_port)]
    if clientapps == "executor":
        argv += ["--isolation", "process",
                 "--superexec-auth-secret-file", str(executor_secret(dep, node))]
    elif clientapps != "flower":
        raise DeploymentError(f"clientapps={clientapps!r}: expected one of {CLIENTAPPS}")
    return Command(argv, {"FLWR_HOME": str(home),
                          "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(TASK_POLL_INTERVAL)})


def node_config(dep: Deployment, node: NodeFiles, run_configs: Sequence[str] = ()) -> str:
    """`node`'s `--node-config`: its data file; the name it gives the server (`client-key`:
    the node's name, never its file's path); the only model and dataset sources it accepts
    (`allow-models`, `allow-data`: the prepared run config's, with each of `run_configs` on
    top of it, and its own data file; see `fl_app.client.node_policy`); and (under
    homomorphic encryption) its secret key file."""
    from fl_app.cli.simulate import load_run_config

    configs = [load_run_config(" ".join(p for p in (dep.run_config, extra) if p) or None)
               for extra in dict.fromkeys(("", *run_configs))]
    models = [str(cfg["model"]) for cfg in configs]
    data = [str(cfg["dataset"]) for cfg in configs] + [str(node.data)]
    pairs = [f"data-path={config_string(str(node.data))}",
             f"{KEY_CLIENT_KEY}={config_string(node.name)}",
             f"{KEY_ALLOW_MODELS}={config_string(config_list(models))}",
             f"{KEY_ALLOW_DATA}={config_string(config_list(data))}"]
    if dep.he_key_held_by is not None:  # made here, or on the node (`he_key_generate`)
        pairs.append(f"he-key-file={config_string(str(dep.he_key(node)))}")
    return " ".join(pairs)


def fused_run_config(*run_configs: str) -> str:
    """`fuse-evaluate=true` (one message per round), unless `run_configs` (later ones
    overriding earlier ones) pick the FedBuff loop, which has no rounds to fuse into."""
    from fl_app.flower_internals import parse_config_args

    chosen = parse_config_args([rc for rc in run_configs if rc])
    return "" if chosen.get("server-loop") == "fedbuff" else f"{KEY_FUSE_EVALUATE}=true"


def he_run_config(dep: Deployment) -> str:
    """The `--run-config` naming the ServerApp's public context, when the deployment uses
    homomorphic encryption (else empty)."""
    path = dep.he_public_context
    return (f"he-public-context={config_string(str(path))}"
            if dep.he_key_held_by is not None else "")


def he_key_generate(dep: Deployment, holder: NodeFiles, node_key: str,
                    python: str = "python") -> Command:
    """`python -m deploy.he_key generate` on the key holder `holder`, signing with its private
    key `node_key`: the CKKS key pair, its own secret key at `dep.he_key(holder)`, the public
    context at `dep.he_public_context`, and a sealed copy `he/node-i.sealed` for every other
    node's public key."""
    others = [str(node.public_key) for node in dep.nodes if node != holder]
    argv = [python, "-m", "deploy.he_key", "generate", "--node-key", node_key, "--out",
            str(dep.he_public_context.parent), "--name", holder.name]
    return Command(argv + (["--for", *others] if others else []))


def he_key_open(dep: Deployment, node: NodeFiles, holder: NodeFiles, node_key: str,
                python: str = "python") -> Command:
    """`python -m deploy.he_key open` on `node`: its sealed copy, which must be signed by the
    key holder `holder`'s public key, opened with its private key `node_key`, written to
    `dep.he_key(node)` (its node-config `he-key-file`)."""
    sealed = dep.he_public_context.parent / f"{node.name}.sealed"
    return Command([python, "-m", "deploy.he_key", "open", "--sealed", str(sealed),
                    "--from", str(holder.public_key), "--node-key", node_key,
                    "--out", str(dep.he_key(node))])


def register(dep: Deployment, node: NodeFiles, cli_home: Path) -> Command:
    """`flwr supernode register`: allow `node`'s public key on the SuperLink (JSON output)."""
    return Command(["flwr", "supernode", "register", str(node.public_key), CONNECTION,
                    "--format", "json"], {"FLWR_HOME": str(cli_home)})


def run_app(cli_home: Path, run_configs: list[str], stream: bool) -> Command:
    """`flwr run . <connection>` from the project folder; JSON output unless `stream`.

    Each of `run_configs` becomes one `--run-config`; a key in a later one overrides it
    in an earlier one.
    """
    argv = ["flwr", "run", ".", CONNECTION]
    for run_config in run_configs:
        if run_config:
            argv += ["--run-config", run_config]
    argv += ["--stream"] if stream else ["--format", "json"]
    return Command(argv, {"FLWR_HOME": str(cli_home)})


def stream_logs(cli_home: Path, run_id: int) -> Command:
    """`flwr log <run-id> --stream`: follow the ServerApp's log until the run ends."""
    return Command(["flwr", "log", str(run_id), CONNECTION, "--stream"],
                   {"FLWR_HOME": str(cli_home)})


def list_run(cli_home: Path, run_id: int) -> Command:
    """`flwr list --run-id`: the run's status as JSON."""
    return Command(["flwr", "list", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                   {"FLWR_HOME": str(cli_home)})


def write_connection(cli_home: Path, address: str, ca_cert: Path) -> Path:
    """Write the flwr CLI's config.toml with the TLS SuperLink connection, as the default
    (mode 600 in a mode-700 folder)."""
    private_dir(cli_home)
    config = {"superlink": {"default": CONNECTION,
                            CONNECTION: {"address": address,
                                         "root-certificates": str(ca_cert)}}}
    return write_private(cli_home / "config.toml", tomli_w.dumps(config))


def config_list(values: Sequence[str]) -> str:
    """`values` as one comma-separated node-config list, each once, in order; a value with a
    comma cannot be listed (`DeploymentError`)."""
    for value in values:
        if "," in value:
            raise DeploymentError(f"{value!r} contains a comma: it cannot be listed in a "
                                  f"node config's {KEY_ALLOW_MODELS}/{KEY_ALLOW_DATA}")
    return ",".join(dict.fromkeys(values))


def config_string(value: str) -> str:
    """`value` quoted for a `--node-config`/`--run-config` string (Flower reads it as TOML).

    Flower splits these strings with a regular expression that knows no escapes, so the
    value is wrapped in a quote it does not contain: double quotes (a TOML basic string)
    unless it holds a backslash, else single quotes (a literal string, no escapes).
    """
    if '"' not in value and "\\" not in value:
        return f'"{value}"'
    if "'" not in value:
        return f"'{value}'"
    raise DeploymentError(f"{value!r} contains both kinds of quotes (or a quote and a "
                          "backslash); Flower's --node-config/--run-config syntax cannot "
                          "carry it")
