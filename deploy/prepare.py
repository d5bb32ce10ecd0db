"""Prepare a deployment folder: node data files, TLS certificates, SuperNode keys, commands.

    python -m deploy.prepare --out DIR --num-nodes N [--partitioner NAME]
        [--run-config "k=v ..."] [--server-host HOST ...] [--port PORT] [--data-format npz|csv]
        [--force]

Node i's data is partition i of N of the run's dataset, cut by the configured flwr-datasets
partitioner (the same split a simulation with N SuperNodes uses); the server keeps the
held-out test set. The folder layout is described in `deploy.layout`; the printed commands
start the SuperLink, register the SuperNodes' public keys, start the SuperNodes and run
the app: paste them into separate terminals, or let `python -m deploy.launch` run them.
A folder that already holds a deployment is refused (its CA and keys are in use) unless
`--force` replaces them. Every file written is mode 600, every folder mode 700
(`deploy.files`); the printed commands run with umask 077 and keep the SuperLink's state
in memory (nothing it relays is written to disk).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from flwr.supercore.constant import (
    SUPERLINK_UVICORN_DEFAULT_PORT,
    SUPERNODE_UVICORN_DEFAULT_PORT,
)

from deploy import commands, files, pki
from deploy.layout import CONNECTION, MANIFEST, Deployment, DeploymentError, NodeFiles
from fl_app.app.config import check_num_clients
from fl_app.cli.simulate import PROJECT_DIR, load_run_config
from fl_app.data.sources import DataError, data_source
from fl_app.schema import ConfigError, RunConfig

DATA_FORMATS = ("npz", "csv")
SECRETS = (MANIFEST, "certs", "keys")  # what a second `prepare` would silently replace


def write_node_data(cfg: RunConfig, num_nodes: int, data_dir: Path, fmt: str) -> list[Path]:
    """Write partition i of `num_nodes` of the run's dataset to `data_dir/node-i.<fmt>`.

    The files follow `fl_app.data.node_files`'s schema: `.npz` with arrays `x` and `y`, or `.csv`
    with one column per feature and a `label` column. Each file is mode 600 from its creation,
    in a mode-700 folder.
    """
    files.private_dir(data_dir)
    source = data_source(cfg)
    paths = []
    for i in range(num_nodes):
        split = source.partition(i, num_nodes)  # DataError naming the partitioner if empty
        path = data_dir / f"node-{i}.{fmt}"
        if fmt == "npz":
            with files.create_private(path) as file:  # a file object: no ".npz" appended
                np.savez(file, x=split.x, y=split.y)
        else:
            flat = split.x.reshape(len(split), -1)
            header = ",".join([f"f{j}" for j in range(flat.shape[1])] + ["label"])
            table = np.column_stack([flat, split.y])
            with files.create_private(path, text=True) as file:
                np.savetxt(file, table, delimiter=",", header=header, comments="",
                           fmt=["%.8g"] * flat.shape[1] + ["%d"])
        paths.append(path)
    return paths


def check_fresh(root: Path) -> None:
    """Refuse a folder that already holds a deployment's manifest, certificates or keys."""
    found = [name for name in SECRETS if (root / name).exists()]
    if found:
        raise DeploymentError(
            f"{root} already holds a deployment ({', '.join(found)}): preparing it again "
            "would replace its CA and keys, which its SuperLink and SuperNodes use; pass "
            "--force to replace them, or choose another --out")


def prepare(out: Path, num_nodes: int, run_config: str, server_hosts: list[str],
            port: int = SUPERLINK_UVICORN_DEFAULT_PORT, data_format: str = "npz",
            force: bool = False) -> Deployment:
    """Make a deployment folder for `num_nodes` SuperNodes; return its manifest.

    A folder that already holds one is refused unless `force` (then its CA, certificates,
    keys, data files and manifest are replaced). Files are written mode 600, folders mode
    700; `out` itself is made mode 700 if it is created here (an existing one keeps its mode).
    """
    if num_nodes < 1:
        raise DeploymentError("--num-nodes must be at least 1")
    root = out.expanduser().resolve()
    if not force:
        check_fresh(root)
    cfg = load_run_config(run_config or None)
    check_num_clients(cfg, num_nodes)  # before any key or data file is written
    files.private_dir(root, tighten=False)
    data_paths = write_node_data(cfg, num_nodes, root / "data", data_format)
    pki.make_tls(root / "certs", server_hosts)
    nodes = []
    for i, data in enumerate(data_paths):
        key = root / "keys" / f"node-{i}"
        pki.make_node_keys(key)
        nodes.append(NodeFiles(f"node-{i}", key, data))
    dep = Deployment(root, tuple(nodes), run_config, server_hosts[0], port)
    commands.write_connection(dep.cli_home, superlink_address(dep), dep.ca_cert)
    dep.save()
    return dep


def superlink_address(dep: Deployment) -> str:
    """host:port where SuperNodes and the CLI reach the SuperLink."""
    return f"{dep.server_host}:{dep.port}"


def instructions(dep: Deployment, project_dir: Path = PROJECT_DIR) -> str:
    """The commands to start the deployment by hand, one terminal each, in order.

    The SuperLink binds 127.0.0.1 when SuperNodes dial a loopback address, else all
    interfaces (SuperNodes on other machines). Every command runs with umask 077, and the
    SuperLink keeps its state in memory: the registrations last until it stops.
    """
    homes = dep.root / "homes"
    bind = "127.0.0.1" if dep.server_host in pki.LOOPBACK else "0.0.0.0"
    link = commands.superlink(dep, homes / "superlink", bind, dep.port)
    lines = ["# 1. SuperLink (TLS on, SuperNode authentication on; state in memory, so nothing "
             "it relays is written to disk: after a restart, register the nodes again):",
             link.shell(), "",
             f"# 2. Register each SuperNode's public key (the flwr CLI's connection "
             f"'{CONNECTION}' is in {dep.cli_home}/config.toml):"]
    lines += [commands.register(dep, node, dep.cli_home).shell() for node in dep.nodes]
    lines += ["", "# 3. One SuperNode per node (each with its own key and data file):"]
    lines += [commands.supernode(dep, node, homes / node.name, superlink_address(dep),
                                 SUPERNODE_UVICORN_DEFAULT_PORT + i).shell()
              for i, node in enumerate(dep.nodes)]
    run_configs = [f"min-available-clients={len(dep.nodes)}", dep.run_config]
    lines += ["", "# 4. Run the app and stream the ServerApp's log (results go to out-dir, "
              "on the SuperLink's machine):",
              commands.run_app(dep.cli_home, run_configs, stream=True).shell(cwd=project_dir)]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="deployment folder to write")
    parser.add_argument("--num-nodes", type=int, required=True, help="number of SuperNodes")
    parser.add_argument("--partitioner", default=None,
                        help="flwr-datasets partitioner (run-config key `partitioner`)")
    parser.add_argument("--run-config", default="",
                        help="run-config overrides used to cut the data and for the run")
    parser.add_argument("--server-host", action="append", default=None,
                        help="host name or IP the SuperLink's certificate is valid for; the "
                             "first is the address SuperNodes dial (repeatable; default "
                             "127.0.0.1 and localhost; the loopback names are always added)")
    parser.add_argument("--port", type=int, default=SUPERLINK_UVICORN_DEFAULT_PORT,
                        help=f"SuperLink port (default {SUPERLINK_UVICORN_DEFAULT_PORT})")
    parser.add_argument("--data-format", choices=DATA_FORMATS, default="npz",
                        help="node data file format (default npz)")
    parser.add_argument("--force", action="store_true",
                        help="replace the CA, keys and data of a folder prepared before")
    return parser.parse_args(argv)


def run_config_with(run_config: str, partitioner: str | None) -> str:
    """`run_config` with `partitioner` set when given."""
    if partitioner is None:
        return run_config
    return " ".join(p for p in (run_config, f"partitioner={commands.config_string(partitioner)}") if p)


def main(argv: list[str] | None = None) -> int:
    """Prepare the folder and print the commands."""
    args = parse_args(argv)
    run_config = run_config_with(args.run_config, args.partitioner)
    hosts = args.server_host or ["127.0.0.1", "localhost"]
    try:
        dep = prepare(args.out, args.num_nodes, run_config, hosts, args.port, args.data_format,
                      force=args.force)
    except (DeploymentError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Prepared {len(dep.nodes)} SuperNodes in {dep.root}\n")
    print(instructions(dep))
    print(f"\n# Or all at once on this machine: python -m deploy.launch --dir {dep.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
