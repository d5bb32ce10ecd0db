"""A prepared deployment folder and its manifest (`deployment.json`).

```
DIR/deployment.json        what `deploy.prepare` made (paths relative to DIR)
DIR/certs/ca.crt           CA certificate: every SuperNode and the flwr CLI need it
DIR/certs/server.pem, .key the SuperLink's certificate and private key (SuperLink only)
DIR/keys/node-i.pub        SuperNode i's public key (registration)
DIR/keys/node-i            its private key (node i only); absent when node i made its own
                           key pair (`deploy.prepare --node-public-keys`, `deploy.node_key`)
DIR/data/node-i.npz|.csv   SuperNode i's own data (node i only)
DIR/he/node-i.ckks         homomorphic-encryption=ckks: the nodes' shared secret key, node
                           i's copy (node i only; its node-config `he-key-file`); absent
                           when the nodes make it (`deploy.prepare --he-keys nodes`,
                           `deploy.he_key`): then only node i writes it, on its machine
DIR/he/public_context.ckks the public context, without the secret key (the ServerApp's
                           `he-public-context`; with `--he-keys nodes` the key holder
                           makes it and the SuperLink host puts it there)
DIR/flwr-home/config.toml  the flwr CLI's SuperLink connection (FLWR_HOME for `flwr ...`)
DIR/launch/logs/           the process logs of `deploy.launch`
```

Every file in it is mode 600 and every folder mode 700 (`deploy.files`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from deploy.files import write_private

MANIFEST = "deployment.json"
CONNECTION = "local-deployment"


class DeploymentError(RuntimeError):
    """A deployment cannot be prepared, started or run; the message says which part failed."""


KEY_IN_FOLDER = "this folder"  # `private_key_held_by` in the manifest: made by prepare
KEY_ON_NODE = "node"  # made by the node itself; the folder has its public key only


@dataclass(frozen=True)
class NodeFiles:
    """One SuperNode's files: its name, its private key, its data and its public key.

    `key` is None when the node made its own key pair and holds the private key itself:
    the folder then has only the public key, and the SuperNode can only start on its node.
    """

    name: str
    key: Path | None
    data: Path
    public_key: Path  # the OpenSSH public key that `flwr supernode register` takes

    @property
    def private_key_held_by(self) -> str:
        """Who holds the private key: `KEY_IN_FOLDER` or `KEY_ON_NODE`."""
        return KEY_ON_NODE if self.key is None else KEY_IN_FOLDER


@dataclass(frozen=True)
class Deployment:
    """A prepared deployment folder: certificates, node keys and data, and the run config."""

    root: Path
    nodes: tuple[NodeFiles, ...]
    run_config: str
    server_host: str
    port: int
    he_key_held_by: str | None = None  # homomorphic encryption: KEY_IN_FOLDER or KEY_ON_NODE

    @property
    def ca_cert(self) -> Path:
        """The CA certificate that SuperNodes and the CLI verify the SuperLink with."""
        return self.root / "certs" / "ca.crt"

    @property
    def server_cert(self) -> Path:
        """The SuperLink's TLS certificate."""
        return self.root / "certs" / "server.pem"

    @property
    def server_key(self) -> Path:
        """The SuperLink's TLS private key."""
        return self.root / "certs" / "server.key"

    @property
    def he_public_context(self) -> Path:
        """homomorphic-encryption=ckks: the public context the ServerApp gets."""
        return self.root / "he" / "public_context.ckks"

    def he_key(self, node: NodeFiles) -> Path:
        """homomorphic-encryption=ckks: `node`'s copy of the nodes' shared secret key."""
        return self.root / "he" / f"{node.name}.ckks"

    @property
    def cli_home(self) -> Path:
        """FLWR_HOME for the `flwr` CLI (holds config.toml with the SuperLink connection)."""
        return self.root / "flwr-home"

    def save(self) -> Path:
        """Write the manifest to `<root>/deployment.json` (mode 600)."""
        data = {
            "run_config": self.run_config,
            "server_host": self.server_host,
            "port": self.port,
            "he_key_held_by": self.he_key_held_by,
            "nodes": [{**{k: self._relative(v) if isinstance(v, Path) else v
                          for k, v in asdict(node).items()},
                       "private_key_held_by": node.private_key_held_by}
                      for node in self.nodes],
        }
        return write_private(self.root / MANIFEST, json.dumps(data, indent=2) + "\n")

    def _relative(self, path: Path) -> str:
        """`path` relative to the folder when inside it (so the folder can move), else as is."""
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    @classmethod
    def load(cls, root: Path) -> Deployment:
        """Read the manifest of a folder made by `deploy.prepare`."""
        root = root.expanduser().resolve()
        path = root / MANIFEST
        if not path.is_file():
            raise DeploymentError(f"{path} not found: prepare the folder first with "
                                  f"`python -m deploy.prepare --out {root} --num-nodes N`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            nodes = tuple(_node(root, n) for n in data["nodes"])
            he_held = data.get("he_key_held_by",  # a manifest from before the field
                               KEY_IN_FOLDER if (root / "he").is_dir() else None)
            return cls(root, nodes, data["run_config"], data["server_host"], int(data["port"]),
                       he_held)
        except (ValueError, KeyError, TypeError) as err:
            raise DeploymentError(f"{path} is not a valid deployment manifest: {err!r}") from err


def _node(root: Path, entry: dict) -> NodeFiles:
    """A node of the manifest. Its private key is None when held by the node; a manifest
    written before public keys were recorded has the public key beside the private one."""
    key = None if entry["key"] is None else root / entry["key"]
    public = entry["public_key"] if "public_key" in entry else entry["key"] + ".pub"
    return NodeFiles(entry["name"], key, root / entry["data"], root / public)
