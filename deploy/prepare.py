"""Prepare a deployment folder: node data files, TLS certificates, SuperNode keys, commands.

    python -m deploy.prepare --out DIR --num-nodes N [--partitioner NAME]
        [--run-config "k=v ..."] [--server-host HOST ...] [--port PORT] [--data-format npz|csv]
        [--node-public-keys KEYS] [--he-keys here|nodes] [--force]

With `--node-public-keys KEYS` each node has made its own key pair (`python -m
deploy.node_key`, or `ssh-keygen -t ecdsa -b 384`) and handed over only its public key,
`KEYS/node-i.pub`: those are checked (ECDSA P-384, one per node) and copied, and no private
key is made or kept here; each node starts its SuperNode with its own private key. Without
it the SuperNodes' key pairs are made here, for a one-machine trial (`deploy.launch`).
Under `homomorphic-encryption=ckks`, `--he-keys nodes` (the default with
`--node-public-keys`) makes no CKKS key here: one node makes it (`python -m deploy.he_key`)
and seals it to the other nodes' public keys, as the printed step 0 says; `--he-keys here`
(the default otherwise) makes it here, every node's copy in `he/`, for a one-machine trial.

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
import shutil
import sys
from pathlib import Path

import numpy as np

from deploy import commands, files, pki
from deploy.layout import (
    CONNECTION,
    KEY_IN_FOLDER,
    KEY_ON_NODE,
    MANIFEST,
    Deployment,
    DeploymentError,
    NodeFiles,
)
from deploy.node_key import NODE_KEY_COMMAND, NODE_KEY_PATH
from fl_app.app.config import check_num_clients
from fl_app.cli.simulate import PROJECT_DIR, load_run_config
from fl_app.data.sources import DataError, data_source
from fl_app.data.types import DataSettings
from fl_app.flower_internals import SUPERLINK_UVICORN_DEFAULT_PORT, SUPERNODE_UVICORN_DEFAULT_PORT
from fl_app.protocol import ckks
from fl_app.schema import ConfigError, RunConfig

DATA_FORMATS = ("npz", "csv")
HE_KEYS = {"here": KEY_IN_FOLDER, "nodes": KEY_ON_NODE}  # --he-keys: who makes the CKKS key
SECRETS = (MANIFEST, "certs", "keys", "he")  # what a second `prepare` would silently replace


def write_node_data(cfg: RunConfig, num_nodes: int, data_dir: Path, fmt: str) -> list[Path]:
    """Write partition i of `num_nodes` of the run's dataset to `data_dir/node-i.<fmt>`.

    The files follow `fl_app.data.node_files`'s schema: `.npz` with arrays `x` and `y`, or `.csv`
    with one column per feature and a `label` column. Each file is mode 600 from its creation,
    in a mode-700 folder.
    """
    files.private_dir(data_dir)
    source = data_source(DataSettings.from_config(cfg))
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


def write_he_keys(dep: Deployment) -> None:
    """homomorphic-encryption=ckks: one new CKKS key, a copy of the secret context per node
    and the public context (without the secret key) for the ServerApp; all 0600, in `he/`
    (0700). For a one-machine trial (`--he-keys here`): this machine then holds the secret
    key; a real deployment makes it on a node (`--he-keys nodes`, `deploy.he_key`)."""
    files.private_dir(dep.he_public_context.parent)
    ctx = ckks.new_secret_context()
    files.write_private(dep.he_public_context, ckks.public_bytes(ctx))
    secret = ckks.secret_bytes(ctx)
    for node in dep.nodes:
        files.write_private(dep.he_key(node), secret)


def he_key_holder(cfg: RunConfig, he_keys: str | None, node_keys_on_nodes: bool) -> str | None:
    """Who makes the CKKS key (`Deployment.he_key_held_by`): None without homomorphic
    encryption, else `--he-keys` (default: the nodes when they hold their own keys)."""
    if cfg["homomorphic-encryption"] == "none":
        if he_keys is not None:
            raise DeploymentError(f"--he-keys {he_keys} needs run-config "
                                  "homomorphic-encryption='ckks'")
        return None
    return HE_KEYS[he_keys or ("nodes" if node_keys_on_nodes else "here")]


def check_fresh(root: Path) -> None:
    """Refuse a folder that already holds a deployment's manifest, certificates or keys."""
    found = [name for name in SECRETS if (root / name).exists()]
    if found:
        raise DeploymentError(
            f"{root} already holds a deployment ({', '.join(found)}): preparing it again "
            "would replace its CA and keys, which its SuperLink and SuperNodes use; pass "
            "--force to replace them, or choose another --out")


def read_public_keys(folder: Path, num_nodes: int) -> list[bytes]:
    """The public keys the nodes handed over, `folder/node-i.pub` for i < `num_nodes`, as
    OpenSSH lines.

    Raises `DeploymentError` naming the file unless each is one ECDSA P-384 public key and
    no two are the same, or if `folder` holds a `node-j.pub` for a node beyond `num_nodes`.
    """
    folder = folder.expanduser()
    if not folder.is_dir():
        raise DeploymentError(f"--node-public-keys: {folder} is not a folder")
    names = [f"node-{i}.pub" for i in range(num_nodes)]
    extra = sorted(path.name for path in folder.glob("node-*.pub") if path.name not in names)
    if extra:
        raise DeploymentError(f"--node-public-keys: {folder} holds {', '.join(extra)}, but "
                              f"--num-nodes {num_nodes} expects node-0.pub to "
                              f"node-{num_nodes - 1}.pub")
    keys: dict[bytes, Path] = {}
    for path in (folder / name for name in names):
        try:
            key = pki.openssh_public_key(pki.read_node_public_key(path))
        except ValueError as err:
            raise DeploymentError(f"--node-public-keys: {err}") from None
        if key in keys:
            raise DeploymentError(f"--node-public-keys: {path} is the same key as "
                                  f"{keys[key]}: every node needs a key pair of its own")
        keys[key] = path
    return list(keys)


def prepare(out: Path, num_nodes: int, run_config: str, server_hosts: list[str],
            port: int = SUPERLINK_UVICORN_DEFAULT_PORT, data_format: str = "npz",
            force: bool = False, node_public_keys: Path | None = None,
            he_keys: str | None = None) -> Deployment:
    """Make a deployment folder for `num_nodes` SuperNodes; return its manifest.

    With `node_public_keys` (a folder with the nodes' `node-i.pub`), node i's public key is
    copied from there and no private key is written: the manifest records that the node
    holds it. Otherwise each node's key pair is made here (a one-machine trial).
    A folder that already holds one is refused unless `force` (then its CA, certificates,
    keys, data files and manifest are replaced). `he_keys` (`HE_KEYS`) says where the CKKS
    key is made (`he_key_holder`). Files are written mode 600, folders mode
    700; `out` itself is made mode 700 if it is created here (an existing one keeps its mode).
    """
    if num_nodes < 1:
        raise DeploymentError("--num-nodes must be at least 1")
    root = out.expanduser().resolve()
    if not force:
        check_fresh(root)
    cfg = load_run_config(run_config or None)
    check_num_clients(cfg, num_nodes)  # before any key or data file is written
    he_held = he_key_holder(cfg, he_keys, node_public_keys is not None)
    public_keys = (None if node_public_keys is None
                   else read_public_keys(node_public_keys, num_nodes))
    files.private_dir(root, tighten=False)
    data_paths = write_node_data(cfg, num_nodes, root / "data", data_format)
    pki.make_tls(root / "certs", server_hosts)
    nodes = []
    for i, data in enumerate(data_paths):
        key = root / "keys" / f"node-{i}"
        if public_keys is None:
            nodes.append(NodeFiles(f"node-{i}", key, data, pki.make_node_keys(key)))
            continue
        key.unlink(missing_ok=True)  # a private key made here by an earlier (--force'd) trial
        files.private_dir(key.parent)
        public = files.write_private(key.with_name(key.name + ".pub"), public_keys[i])
        nodes.append(NodeFiles(f"node-{i}", None, data, public))
    dep = Deployment(root, tuple(nodes), run_config, server_hosts[0], port, he_held)
    shutil.rmtree(dep.he_public_context.parent, ignore_errors=True)  # a --force'd folder's key
    if he_held == KEY_IN_FOLDER:
        write_he_keys(dep)
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
    on_nodes = [node for node in dep.nodes if node.key is None]
    lines = [] if on_nodes else [
        ("# The SuperNodes' key pairs in keys/ were made here, for a one-machine trial. For "
         "a real deployment each node makes its own key pair on its own machine and hands "
         "over only the public key, e.g."),
        f"#   {NODE_KEY_COMMAND.format(name='node-i')}",
        f"#   (or: ssh-keygen -t ecdsa -b 384 -N '' -f {NODE_KEY_PATH.format(name='node-i')})",
        ("# Collect node-0.pub ... in one folder and prepare with --node-public-keys FOLDER: "
         "then no private key is ever on this machine."), ""]
    lines += he_key_steps(dep, project_dir)
    lines += [("# 1. SuperLink (TLS on, SuperNode authentication on; state in memory, so "
               "nothing it relays is written to disk: after a restart, register the nodes "
               "again):"), link.shell(), "",
              (f"# 2. Register each SuperNode's public key (the flwr CLI's connection "
               f"'{CONNECTION}' is in {dep.cli_home}/config.toml):")]
    if on_nodes:
        lines += [("# Before registering a key that a node handed over, check its "
                   "fingerprint with that node's operator (`ssh-keygen -lf` on its .pub "
                   "file):")]
        lines += [f"#   {node.name}: {_fingerprint(node)}" for node in on_nodes]
    lines += [commands.register(dep, node, dep.cli_home).shell() for node in dep.nodes]
    lines += ["", ("# 3. One SuperNode per node (each with its own key and data file; its "
                   "node config accepts only the prepared model and dataset, allow-models and "
                   "allow-data: a node's operator may widen or narrow them):")]
    if on_nodes:
        lines += [("# Each node runs its SuperNode on its own machine with the private key it "
                   "made itself, which never leaves that machine: pass its path to "
                   "--auth-supernode-private-key (below: "
                   f"{NODE_KEY_PATH.format(name='node-i')}, where "
                   f"`{NODE_KEY_COMMAND.format(name='node-i')}` puts it).")]
    lines += [("# Each SuperNode runs with --isolation process: it launches nothing itself, and "
               "only its executor (step 3b), which holds the node's SuperExec secret, takes "
               "its tasks. Make each node's secret first (mode 600), on the node:")]
    lines += [commands.new_secret(dep, node).shell(cwd=project_dir) for node in dep.nodes]
    lines += [commands.supernode(dep, node, homes / node.name, superlink_address(dep),
                                 SUPERNODE_UVICORN_DEFAULT_PORT + i,
                                 _node_side_key(node)).shell()
              for i, node in enumerate(dep.nodes)]
    lines += ["", ("# 3b. Next to each SuperNode, from the project folder, its executor (one "
                   "warm ClientApp process: TensorFlow, the node's data and the model stay "
                   "loaded across messages). Pass --parent-pid <the SuperNode's pid> to stop "
                   "it with the SuperNode:")]
    lines += [commands.executor(dep, node, homes / f"{node.name}-executor",
                                SUPERNODE_UVICORN_DEFAULT_PORT + i).shell(cwd=project_dir)
              for i, node in enumerate(dep.nodes)]
    run_configs = [f"min-available-clients={len(dep.nodes)}",
                   commands.fused_run_config(dep.run_config), commands.he_run_config(dep),
                   dep.run_config]
    lines += ["", "# 4. Run the app and stream the ServerApp's log (results go to out-dir, "
              "on the SuperLink's machine):",
              commands.run_app(dep.cli_home, run_configs, stream=True).shell(cwd=project_dir)]
    return "\n".join(lines)


def he_key_steps(dep: Deployment, project_dir: Path = PROJECT_DIR) -> list[str]:
    """The printed lines on the CKKS key: where it was made, or step 0, which makes it on
    the first node and hands it to the others sealed to their own public keys."""
    if dep.he_key_held_by == KEY_IN_FOLDER:
        return [(f"# The nodes' shared CKKS secret key is in {dep.he_public_context.parent}, "
                 "made here for a one-machine trial: whoever can read it can decrypt every "
                 "update. For a real deployment prepare with --he-keys nodes: a node makes "
                 "it and seals it to the other nodes' keys, and this machine never holds it."),
                ""]
    if dep.he_key_held_by != KEY_ON_NODE:
        return []
    holder, others = dep.nodes[0], dep.nodes[1:]
    lines = [(f"# 0. The nodes' shared CKKS secret key is made on {holder.name}, the key holder, "
              "never here or on the SuperLink host. On it, from the project folder, with its "
              "own private key (it signs the sealed files) and the other nodes' public keys "
              f"(copies of {dep.root}/keys/node-i.pub; check each fingerprint, printed by the "
              "command, with its node):"),
             commands.he_key_generate(dep, holder, _private_key(holder))
             .shell(cwd=project_dir),
             (f"# {holder.name} keeps {dep.he_key(holder)}; copy "
              f"{dep.he_public_context} (no secret key) to the SuperLink host at that path"
              + (f", and to each node i he/node-i.sealed (only node i can open it) and "
                 f"{holder.public_key} ({holder.name}'s public key, fingerprint "
                 f"{_fingerprint(holder)}: check it with {holder.name}'s operator; `open` "
                 "refuses a file it did not sign). Node i opens it:" if others else "."))]
    lines += [commands.he_key_open(dep, node, holder, _private_key(node))
              .shell(cwd=project_dir) for node in others]
    if others:
        lines.append("# Every node's command prints the public context's fingerprint: compare "
                     f"it with the one {holder.name}'s printed (one key for all).")
    return lines + [""]


def _fingerprint(node: NodeFiles) -> str:
    """The SHA256 fingerprint of `node`'s public key."""
    return pki.fingerprint(pki.read_node_public_key(node.public_key))


def _private_key(node: NodeFiles) -> str:
    """Where `node`'s private key is: on its own machine, or in the folder."""
    return _node_side_key(node) or str(node.key)


def _node_side_key(node: NodeFiles) -> str | None:
    """Where a node that holds its own private key has it (as `deploy.node_key` suggests);
    None for a key in the folder."""
    return NODE_KEY_PATH.format(name=node.name) if node.key is None else None


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
    parser.add_argument("--node-public-keys", type=Path, default=None, metavar="KEYS",
                        help="folder with the public keys node-0.pub ... that the nodes made "
                             "themselves (`python -m deploy.node_key`): no private key is "
                             "made here (default: make every node's key pair here, for a "
                             "one-machine trial)")
    parser.add_argument("--he-keys", choices=tuple(HE_KEYS), default=None,
                        help="homomorphic-encryption=ckks: who makes the nodes' shared CKKS "
                             "secret key: 'nodes' (one node, `python -m deploy.he_key`, sealed "
                             "to the others' public keys: this machine never holds it; the "
                             "default with --node-public-keys) or 'here' (every node's copy in "
                             "he/, for a one-machine trial; the default otherwise)")
    parser.add_argument("--force", action="store_true",
                        help="replace the CA, keys and data of a folder prepared before")
    return parser.parse_args(argv)


def run_config_with(run_config: str, partitioner: str | None) -> str:
    """`run_config` with `partitioner` set when given."""
    if partitioner is None:
        return run_config
    partitioning = f"partitioner={commands.config_string(partitioner)}"
    return " ".join(p for p in (run_config, partitioning) if p)


def main(argv: list[str] | None = None) -> int:
    """Prepare the folder and print the commands."""
    args = parse_args(argv)
    run_config = run_config_with(args.run_config, args.partitioner)
    hosts = args.server_host or ["127.0.0.1", "localhost"]
    try:
        dep = prepare(args.out, args.num_nodes, run_config, hosts, args.port, args.data_format,
                      force=args.force, node_public_keys=args.node_public_keys,
                      he_keys=args.he_keys)
    except (DeploymentError, ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    held = (f" (public keys from {args.node_public_keys}; each private key stays on its "
            "node)" if args.node_public_keys else "")
    print(f"Prepared {len(dep.nodes)} SuperNodes in {dep.root}{held}\n")
    print(instructions(dep))
    if all(node.key for node in dep.nodes):
        print(f"\n# Or all at once on this machine: python -m deploy.launch --dir {dep.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
