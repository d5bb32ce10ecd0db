"""Make the nodes' shared CKKS key on one node; hand it to the others sealed to their own keys.

    python -m deploy.he_key generate --out DIR [--name NAME] --for node-1.pub [node-2.pub ...]
    python -m deploy.he_key open --sealed FILE --node-key KEY --out FILE

Under `homomorphic-encryption=ckks` every node holds the same CKKS secret key and the
server only the public context. `generate` runs on one node, the key holder: it makes the
key pair and writes `DIR/NAME.ckks` (its own secret context, its node-config
`he-key-file`), `DIR/public_context.ckks` (the public context, without the secret key: copy
it to the SuperLink host for run-config `he-public-context`) and, for every other node's
public key `X.pub` (the ECDSA P-384 key of `deploy.node_key`), `DIR/X.sealed`: the secret
context encrypted to that key. A sealed file may travel over any channel: only the node
holding the matching private key can open it, and any change to it is detected. `open`
runs on that node and writes the secret context (its `he-key-file`). So neither the
machine that prepares the deployment nor the SuperLink host ever holds the secret key.

Sealing is ECIES: an ephemeral P-384 key agrees a secret with the recipient's key (ECDH),
HKDF-SHA256 (info: purpose label, both public points) turns it into an AES-256-GCM key,
and the recipient's key fingerprint with the purpose label is the associated data. The
file is `MAGIC`, the recipient's fingerprint and a newline, the ephemeral public point
(uncompressed, 97 bytes), a 12-byte nonce and the ciphertext with its tag.

The key holder must check each recipient's fingerprint (printed here) with that node's
operator, as the SuperLink's operator does before registering the key: a public key
substituted on the way would receive the secret key. Every file is written mode 600 (in a
folder made mode 700 if missing) and never over an existing file.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from deploy import files, pki
from strategies import ckks

MAGIC = b"fl-keras sealed CKKS secret context v1\n"
PURPOSE = b"fl-keras: the nodes' shared CKKS secret context"
PUBLIC_CONTEXT_NAME = "public_context.ckks"
SECRET_SUFFIX = ".ckks"
SEALED_SUFFIX = ".sealed"
POINT_BYTES = 97  # an uncompressed P-384 point
NONCE_BYTES = 12


@dataclass(frozen=True)
class GeneratedKeys:
    """What `generate` wrote: the key holder's secret context, the server's public context,
    and one sealed file per recipient (recipient's public key file -> sealed file)."""

    secret: Path
    public: Path
    sealed: dict[Path, Path]


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.X962,
                            serialization.PublicFormat.UncompressedPoint)


def _aead(shared: bytes, ephemeral: ec.EllipticCurvePublicKey,
          recipient: ec.EllipticCurvePublicKey) -> AESGCM:
    """The AES-256-GCM key both sides derive from the ECDH secret."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=PURPOSE + _point(ephemeral) + _point(recipient)).derive(shared)
    return AESGCM(key)


def _associated_data(fingerprint: str) -> bytes:
    return PURPOSE + b"\n" + fingerprint.encode("ascii")


def seal(secret: bytes, recipient: ec.EllipticCurvePublicKey) -> bytes:
    """`secret` encrypted to `recipient` (ECIES: ECDH P-384, HKDF-SHA256, AES-256-GCM)."""
    ephemeral = ec.generate_private_key(ec.SECP384R1())
    aead = _aead(ephemeral.exchange(ec.ECDH(), recipient), ephemeral.public_key(), recipient)
    fingerprint = pki.fingerprint(recipient)
    nonce = os.urandom(NONCE_BYTES)
    return (MAGIC + fingerprint.encode("ascii") + b"\n" + _point(ephemeral.public_key())
            + nonce + aead.encrypt(nonce, secret, _associated_data(fingerprint)))


def unseal(sealed: bytes, key: ec.EllipticCurvePrivateKey, source: Path) -> bytes:
    """The secret in `sealed` (read from `source`), opened with the node's private `key`.

    Raises `ValueError` naming `source` if it is not a sealed file, was sealed for another
    node's key, or was altered.
    """
    if not sealed.startswith(MAGIC):
        raise ValueError(f"{source} is not a sealed CKKS key file (made by "
                         "`python -m deploy.he_key generate`)")
    header, newline, body = sealed[len(MAGIC):].partition(b"\n")
    mine = pki.fingerprint(key.public_key())
    if not newline or header != mine.encode("ascii"):
        named = header.decode("ascii", "replace")[:60] if newline else "no key"
        raise ValueError(f"{source} was sealed for the node key {named}, not for this node's "
                         f"key ({mine}): open it on the node it was made for, or ask the key "
                         "holder to seal the key for this node's public key")
    if len(body) <= POINT_BYTES + NONCE_BYTES:
        raise ValueError(f"{source} is truncated: ask the key holder for it again")
    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP384R1(),
                                                                 body[:POINT_BYTES])
        aead = _aead(key.exchange(ec.ECDH(), ephemeral), ephemeral, key.public_key())
        nonce = body[POINT_BYTES:POINT_BYTES + NONCE_BYTES]
        return aead.decrypt(nonce, body[POINT_BYTES + NONCE_BYTES:], _associated_data(mine))
    except (InvalidTag, ValueError):
        raise ValueError(f"{source} has been altered or damaged (it does not authenticate "
                         "under this node's key): ask the key holder for it again") from None


def _refuse_existing(paths: list[Path]) -> None:
    """Raise `ValueError` naming the first of `paths` that exists."""
    for path in paths:
        if path.exists() or path.is_symlink():
            raise ValueError(f"{path} already exists: refusing to replace it (a key in use "
                             "would stop working; move it away first)")


def generate(out: Path, name: str, recipients: list[Path]) -> GeneratedKeys:
    """Make the CKKS key pair on this node and write its files into `out` (see the module).

    Raises `ValueError` naming the file at fault: a recipient that is not one ECDSA P-384
    public key, two recipients with one file name or one key, `name` not a file name, or a
    file to be written that exists already. Nothing is written then.
    """
    if name in ("", ".", "..") or Path(name).name != name:
        raise ValueError(f"--name {name!r} must be a file name, not a path")
    out = out.expanduser().resolve()
    keys: dict[Path, ec.EllipticCurvePublicKey] = {}
    sealed: dict[Path, Path] = {}
    for path in recipients:
        key = pki.read_node_public_key(path)
        target = out / (path.name.removesuffix(".pub") + SEALED_SUFFIX)
        for other, other_key in keys.items():
            if pki.fingerprint(other_key) == pki.fingerprint(key):
                raise ValueError(f"--for: {path} is the same key as {other}: every node "
                                 "has a key pair of its own")
            if sealed[other] == target:
                raise ValueError(f"--for: {path} and {other} would both be sealed to "
                                 f"{target}: give the public keys distinct file names")
        keys[path], sealed[path] = key, target
    secret, public = out / (name + SECRET_SUFFIX), out / PUBLIC_CONTEXT_NAME
    _refuse_existing([secret, public, *sealed.values()])
    files.private_dir(out, tighten=False)
    ctx = ckks.new_secret_context()
    secret_bytes = ckks.secret_bytes(ctx)
    ckks.write_new(secret, secret_bytes)
    ckks.write_new(public, ckks.public_bytes(ctx))
    for path, target in sealed.items():
        ckks.write_new(target, seal(secret_bytes, keys[path]))
    return GeneratedKeys(secret, public, sealed)


def open_sealed(sealed: Path, node_key: Path, out: Path) -> Path:
    """Open the sealed file with this node's private key and write the secret context to
    `out` (mode 600; its folder made mode 700 if missing); return `out`.

    Raises `ValueError` naming the file at fault (see `unseal`; also an `out` that exists,
    a node key that is not a P-384 private key) and `ckks.KeyFileError` if the opened
    content is not a secret CKKS context.
    """
    key = pki.read_node_private_key(node_key)
    out = out.expanduser().resolve()
    _refuse_existing([out])
    try:
        data = sealed.read_bytes()
    except OSError as err:
        raise ValueError(f"--sealed {sealed} cannot be read: {err.strerror}") from None
    secret = unseal(data, key, sealed)
    ckks.secret_context_from(secret, f"the key sealed in {sealed}")
    files.private_dir(out.parent, tighten=False)
    return ckks.write_new(out, secret)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of both sub-commands."""
    parser = argparse.ArgumentParser(prog="python -m deploy.he_key", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("generate", help="on the key holder: make the key, seal it "
                                                "for the other nodes")
    make.add_argument("--out", type=Path, required=True, help="folder for the files")
    make.add_argument("--name", default="secret",
                      help="this node's secret key file is OUT/NAME.ckks (default secret)")
    make.add_argument("--for", dest="recipients", type=Path, nargs="*", default=[],
                      metavar="PUB", help="the other nodes' public keys (node-i.pub)")
    unpack = commands.add_parser("open", help="on another node: open its sealed file")
    unpack.add_argument("--sealed", type=Path, required=True, help="the sealed file")
    unpack.add_argument("--node-key", type=Path, required=True,
                        help="this node's private key (deploy.node_key's keys/NAME)")
    unpack.add_argument("--out", type=Path, required=True,
                        help="where to write the secret key file (its he-key-file)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run `generate` or `open`; print what to keep and what to hand over."""
    args = parse_args(argv)
    try:
        if args.command == "open":
            out = open_sealed(args.sealed, args.node_key, args.out)
            print(f"Secret key: {out} (mode 600: keep it on this node; its node config "
                  f"he-key-file). {args.sealed} may be deleted.")
            return 0
        made = generate(args.out, args.name, args.recipients)
    except (ValueError, OSError, ckks.KeyFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Secret key: {made.secret} (mode 600: keep it on this node; its node config "
          "he-key-file)")
    print(f"Public context for the SuperLink host (its run-config he-public-context): "
          f"{made.public}")
    for pub, target in made.sealed.items():
        print(f"Sealed for {pub} ({pki.fingerprint(pki.read_node_public_key(pub))}: check "
              f"this fingerprint with that node's operator): {target}")
    print("Send each sealed file to its node (any channel: only that node can open it), which "
          "runs: python -m deploy.he_key open --sealed FILE --node-key KEY --out FILE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
