"""Make a SuperNode's key pair on the node's own machine; hand over only the public key.

    python -m deploy.node_key --out keys [--name NAME] [--force]

Writes `OUT/NAME`, the ECDSA P-384 private key in OpenSSH format (what `ssh-keygen -t ecdsa
-b 384 -N ''` makes), mode 600 from its creation: it stays on this machine, and the
SuperNode reads it (`flower-supernode --auth-supernode-private-key OUT/NAME`). And
`OUT/NAME.pub`, its public key: send a copy to the deployment's operator, who saves it as
`node-i.pub` in the folder given to `python -m deploy.prepare --node-public-keys` and
registers it. The printed fingerprint lets the operator check that the copy arrived
unchanged (`ssh-keygen -lf node-i.pub`). OUT is created mode 700 if missing (an existing
folder keeps its mode); an existing key pair is not replaced unless `--force` (a registered
key would stop working).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deploy import files, pki

DEFAULT_NAME = "supernode"
NODE_KEY_PATH = "keys/{name}"  # where NODE_KEY_COMMAND puts a node's private key
NODE_KEY_COMMAND = "python -m deploy.node_key --out keys --name {name}"


def make_key_pair(out: Path, name: str = DEFAULT_NAME, force: bool = False) -> Path:
    """Write the key pair `out/name` (private) and `out/name.pub`; return the `.pub` path.

    Raises `ValueError` if `name` is not a plain file name, or if either file exists and
    not `force`.
    """
    if name in ("", ".", "..") or Path(name).name != name:
        raise ValueError(f"--name {name!r} must be a file name, not a path")
    private = files.private_dir(out.expanduser().resolve(), tighten=False) / name
    existing = [path for path in (private, private.with_name(name + ".pub")) if path.exists()]
    if existing and not force:
        raise ValueError(f"{existing[0]} already exists: a key registered with a SuperLink "
                         "would stop working if replaced (--force replaces it)")
    return pki.make_node_keys(private, tighten=False)


def main(argv: list[str] | None = None) -> int:
    """Make the key pair and print what to hand over and what to keep."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the key pair")
    parser.add_argument("--name", default=DEFAULT_NAME,
                        help=f"file name of the private key (default {DEFAULT_NAME}; the "
                             "public key gets .pub appended)")
    parser.add_argument("--force", action="store_true", help="replace an existing key pair")
    args = parser.parse_args(argv)
    try:
        public = make_key_pair(args.out, args.name, args.force)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    private = public.with_name(args.name)
    print(f"Private key: {private} (mode 600: keep it on this machine, never send it)")
    print(f"Public key to hand over: {public}")
    print(f"Its fingerprint: {pki.fingerprint(pki.read_node_public_key(public))} (tell it "
          "to the operator another way, to check the copy they receive)")
    print(f"Start the SuperNode with --auth-supernode-private-key {private}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
