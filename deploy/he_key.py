"""Make the nodes' shared CKKS key on one node; hand it to the others sealed to their own keys.

    python -m deploy.he_key generate --node-key KEY --out DIR [--name NAME] \
        --for node-1.pub [node-2.pub ...]
    python -m deploy.he_key open --sealed FILE --from HOLDER.pub --node-key KEY --out FILE

Under `homomorphic-encryption=ckks` every node holds the same CKKS secret key and the
server only the public context. `generate` runs on one node, the key holder: it makes the
key pair and writes `DIR/NAME.ckks` (its own secret context, its node-config
`he-key-file`), `DIR/public_context.ckks` (the public context, without the secret key: copy
it to the SuperLink host for run-config `he-public-context`) and, for every other node's
public key `X.pub` (the ECDSA P-384 key of `deploy.node_key`), `DIR/X.sealed`: the secret
context encrypted to that key and signed with the key holder's own node key (`--node-key`).
A sealed file may travel over any channel: only the node holding the matching private key
can open it, and `open --from HOLDER.pub` refuses a file that the key holder did not sign
as it is (a changed file, or one that someone else sealed to this node's public key, e.g.
with a CKKS key of their own). `open` runs on that node and writes the secret context (its
`he-key-file`). So neither the machine that prepares the deployment nor the SuperLink host
ever holds the secret key. Both commands print the public context's fingerprint
(`ckks.context_fingerprint`): the operators compare it to check that every node and the
SuperLink host got the same key.

Sealing is ECIES: an ephemeral P-384 key agrees a secret with the recipient's key (ECDH),
HKDF-SHA256 (info: purpose label, both public points) turns it into an AES-256-GCM key,
and the recipient's key fingerprint with the purpose label is the associated data. The
file is `MAGIC`, the recipient's fingerprint and a newline, the signer's fingerprint and a
newline, the ephemeral public point (uncompressed, 97 bytes), a 12-byte nonce, the
ciphertext with its tag, and the signer's ECDSA P-384/SHA-384 signature (r and s, 48 bytes
each) over `SIGNED_LABEL` and everything before it.

The key holder must check each recipient's fingerprint (printed here) with that node's
operator, and each node the key holder's fingerprint (printed by `open`) with the key
holder's operator, as the SuperLink's operator does before registering a key: a public key
substituted on the way would receive the secret key, or pass off another key as the key
holder's. Every file is written mode 600 (in a folder made mode 700 if missing) and never
over an existing file. The node key both signs here and agrees keys (ECDH) for `open`, and
signs SuperNode authentication: each use hashes a different message (here under
`SIGNED_LABEL`, with SHA-384; Flower's with SHA-256), so no signature of one is valid for
another.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from deploy import files, pki
from fl_app.protocol import ckks

MAGIC = b"fl-keras sealed CKKS secret context v2\n"
UNSIGNED_MAGIC = b"fl-keras sealed CKKS secret context v1\n"  # before signatures: refused
PURPOSE = b"fl-keras: the nodes' shared CKKS secret context"
SIGNED_LABEL = PURPOSE + b", sealed and signed by the key holder\n"
PUBLIC_CONTEXT_NAME = "public_context.ckks"
SECRET_SUFFIX = ".ckks"
SEALED_SUFFIX = ".sealed"
POINT_BYTES = 97  # an uncompressed P-384 point
NONCE_BYTES = 12
SCALAR_BYTES = 48  # r and s of a P-384 signature
SIGNATURE_BYTES = 2 * SCALAR_BYTES
SIGNATURE = ec.ECDSA(hashes.SHA384())


@dataclass(frozen=True)
class GeneratedKeys:
    """What `generate` wrote: the key holder's secret context, the server's public context
    (and its fingerprint), one sealed file per recipient (recipient's public key file ->
    sealed file), and the fingerprint of the node key that signed them."""

    secret: Path
    public: Path
    public_fingerprint: str
    sealed: dict[Path, Path]
    signer: str


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    """The public key as an uncompressed X9.62 point."""
    return key.public_bytes(serialization.Encoding.X962,
                            serialization.PublicFormat.UncompressedPoint)


def _aead(shared: bytes, ephemeral: ec.EllipticCurvePublicKey,
          recipient: ec.EllipticCurvePublicKey) -> AESGCM:
    """The AES-256-GCM key both sides derive from the ECDH secret."""
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
               info=PURPOSE + _point(ephemeral) + _point(recipient)).derive(shared)
    return AESGCM(key)


def _associated_data(fingerprint: str) -> bytes:
    """The AES-GCM associated data: the purpose label and the recipient's key fingerprint."""
    return PURPOSE + b"\n" + fingerprint.encode("ascii")


def _sign(content: bytes, signer: ec.EllipticCurvePrivateKey) -> bytes:
    """`signer`'s signature over `content` under `SIGNED_LABEL`, as r and s (fixed length)."""
    r, s = decode_dss_signature(signer.sign(SIGNED_LABEL + content, SIGNATURE))
    return r.to_bytes(SCALAR_BYTES, "big") + s.to_bytes(SCALAR_BYTES, "big")


def _signed_by(content: bytes, signature: bytes, signer: ec.EllipticCurvePublicKey) -> bool:
    """Whether `signature` (`_sign`'s format) is `signer`'s over `content`."""
    der = encode_dss_signature(int.from_bytes(signature[:SCALAR_BYTES], "big"),
                               int.from_bytes(signature[SCALAR_BYTES:], "big"))
    try:
        signer.verify(der, SIGNED_LABEL + content, SIGNATURE)
    except InvalidSignature:
        return False
    return True


def seal(secret: bytes, recipient: ec.EllipticCurvePublicKey,
         signer: ec.EllipticCurvePrivateKey) -> bytes:
    """`secret` encrypted to `recipient` (ECIES: ECDH P-384, HKDF-SHA256, AES-256-GCM) and
    signed by the key holder's node key `signer` (ECDSA P-384, SHA-384)."""
    ephemeral = ec.generate_private_key(ec.SECP384R1())
    aead = _aead(ephemeral.exchange(ec.ECDH(), recipient), ephemeral.public_key(), recipient)
    fingerprint = pki.fingerprint(recipient)
    nonce = os.urandom(NONCE_BYTES)
    content = (MAGIC + fingerprint.encode("ascii") + b"\n"
               + pki.fingerprint(signer.public_key()).encode("ascii") + b"\n"
               + _point(ephemeral.public_key()) + nonce
               + aead.encrypt(nonce, secret, _associated_data(fingerprint)))
    return content + _sign(content, signer)


def _header_line(data: bytes) -> tuple[str | None, bytes]:
    """The first line of `data` (None if it has no newline) and the rest."""
    line, newline, rest = data.partition(b"\n")
    return (line.decode("ascii", "replace")[:60] if newline else None), rest


def unseal(sealed: bytes, key: ec.EllipticCurvePrivateKey,
           holder: ec.EllipticCurvePublicKey, source: Path) -> bytes:
    """The secret in `sealed` (read from `source`), signed by the key holder's public key
    `holder` and opened with the node's private `key`.

    Raises `ValueError` naming `source` if it is not a sealed file, was sealed for another
    node's key, is not signed by `holder` as it is (altered, or sealed by someone else), or
    does not decrypt.
    """
    if sealed.startswith(UNSIGNED_MAGIC):
        raise ValueError(f"{source} is an unsigned sealed file (an older `deploy.he_key`): "
                         "ask the key holder to make the key again, signed")
    if not sealed.startswith(MAGIC):
        raise ValueError(f"{source} is not a sealed CKKS key file (made by "
                         "`python -m deploy.he_key generate`)")
    recipient, rest = _header_line(sealed[len(MAGIC):])
    mine = pki.fingerprint(key.public_key())
    if recipient != mine:
        raise ValueError(f"{source} was sealed for the node key {recipient or 'no key'}, not "
                         f"for this node's key ({mine}): open it on the node it was made for, "
                         "or ask the key holder to seal the key for this node's public key")
    signer, body = _header_line(rest)
    if signer is None or len(body) <= POINT_BYTES + NONCE_BYTES + SIGNATURE_BYTES:
        raise ValueError(f"{source} is truncated: ask the key holder for it again")
    content, signature = sealed[:-SIGNATURE_BYTES], sealed[-SIGNATURE_BYTES:]
    if not _signed_by(content, signature, holder):
        expected = pki.fingerprint(holder)
        raise ValueError(f"{source} is not signed by the key holder's key {expected} (it "
                         f"names the signer {signer}): it was altered, or sealed by someone "
                         "else with a key of their own; do not use it, ask the key holder "
                         "for it again and check --from's fingerprint with the key holder")
    body = body[:-SIGNATURE_BYTES]
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


def generate(out: Path, name: str, recipients: list[Path], node_key: Path) -> GeneratedKeys:
    """Make the CKKS key pair on this node and write its files into `out` (see the module),
    each sealed file signed with this node's private key `node_key`.

    Raises `ValueError` naming the file at fault: a `node_key` that is not one ECDSA P-384
    private key, a recipient that is not one ECDSA P-384 public key, two recipients with one
    file name or one key, a recipient that is this node's own key, `name` not a file name,
    or a file to be written that exists already. Nothing is written then.
    """
    if name in ("", ".", "..") or Path(name).name != name:
        raise ValueError(f"--name {name!r} must be a file name, not a path")
    signer = pki.read_node_private_key(node_key)
    out = out.expanduser().resolve()
    keys: dict[Path, ec.EllipticCurvePublicKey] = {node_key: signer.public_key()}
    sealed: dict[Path, Path] = {}
    for path in recipients:
        key = pki.read_node_public_key(path)
        target = out / (path.name.removesuffix(".pub") + SEALED_SUFFIX)
        for other, other_key in keys.items():
            if pki.fingerprint(other_key) == pki.fingerprint(key):
                whose = ("this node's own key (--node-key): the key holder keeps "
                         f"{name}{SECRET_SUFFIX}" if other == node_key else
                         f"the same key as {other}: every node has a key pair of its own")
                raise ValueError(f"--for: {path} is {whose}")
            if sealed.get(other) == target:
                raise ValueError(f"--for: {path} and {other} would both be sealed to "
                                 f"{target}: give the public keys distinct file names")
        keys[path], sealed[path] = key, target
    secret, public = out / (name + SECRET_SUFFIX), out / PUBLIC_CONTEXT_NAME
    _refuse_existing([secret, public, *sealed.values()])
    files.private_dir(out, tighten=False)
    ctx = ckks.new_secret_context()
    secret_bytes, public_bytes = ckks.secret_bytes(ctx), ckks.public_bytes(ctx)
    ckks.write_new(secret, secret_bytes)
    ckks.write_new(public, public_bytes)
    for path, target in sealed.items():
        ckks.write_new(target, seal(secret_bytes, keys[path], signer))
    return GeneratedKeys(secret, public, ckks.context_fingerprint(public_bytes), sealed,
                         pki.fingerprint(signer.public_key()))


def open_sealed(sealed: Path, holder: Path, node_key: Path, out: Path) -> tuple[Path, str]:
    """Open the sealed file, signed by the key holder's public key `holder`, with this
    node's private key and write the secret context to `out` (mode 600; its folder made
    mode 700 if missing); return `out` and the fingerprint of the key's public context.

    Raises `ValueError` naming the file at fault (see `unseal`; also an `out` that exists,
    a node key that is not a P-384 private key, a `holder` that is not a P-384 public key)
    and `ckks.KeyFileError` if the opened content is not a secret CKKS context.
    """
    key = pki.read_node_private_key(node_key)
    signer = pki.read_node_public_key(holder)
    out = out.expanduser().resolve()
    _refuse_existing([out])
    try:
        data = sealed.read_bytes()
    except OSError as err:
        raise ValueError(f"--sealed {sealed} cannot be read: {err.strerror}") from None
    secret = unseal(data, key, signer, sealed)
    ctx = ckks.secret_context_from(secret, f"the key sealed in {sealed}")
    files.private_dir(out.parent, tighten=False)
    return ckks.write_new(out, secret), ckks.context_fingerprint(ckks.public_bytes(ctx))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of both sub-commands."""
    parser = argparse.ArgumentParser(prog="python -m deploy.he_key", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("generate", help="on the key holder: make the key, seal it "
                                                "for the other nodes")
    make.add_argument("--node-key", type=Path, required=True,
                      help="this node's private key (deploy.node_key's keys/NAME): signs "
                           "each sealed file")
    make.add_argument("--out", type=Path, required=True, help="folder for the files")
    make.add_argument("--name", default="secret",
                      help="this node's secret key file is OUT/NAME.ckks (default secret)")
    make.add_argument("--for", dest="recipients", type=Path, nargs="*", default=[],
                      metavar="PUB", help="the other nodes' public keys (node-i.pub)")
    unpack = commands.add_parser("open", help="on another node: open its sealed file")
    unpack.add_argument("--sealed", type=Path, required=True, help="the sealed file")
    unpack.add_argument("--from", dest="holder", type=Path, required=True, metavar="PUB",
                        help="the key holder's node public key (check its fingerprint with "
                             "the key holder): the sealed file must be signed by it")
    unpack.add_argument("--node-key", type=Path, required=True,
                        help="this node's private key (deploy.node_key's keys/NAME)")
    unpack.add_argument("--out", type=Path, required=True,
                        help="where to write the secret key file (its he-key-file)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run `generate` or `open`; print what to keep, what to hand over and what to compare."""
    args = parse_args(argv)
    try:
        if args.command == "open":
            out, public = open_sealed(args.sealed, args.holder, args.node_key, args.out)
            holder = pki.fingerprint(pki.read_node_public_key(args.holder))
            print(f"Signed by the key holder's key {holder} ({args.holder}: check this "
                  "fingerprint with the key holder's operator).")
            print(f"Secret key: {out} (mode 600: keep it on this node; its node config "
                  f"he-key-file). {args.sealed} may be deleted.")
            print(f"Public context fingerprint: {public} (compare it with the key holder's "
                  "and the SuperLink host's: every node must have the same key)")
            return 0
        made = generate(args.out, args.name, args.recipients, args.node_key)
    except (ValueError, OSError, ckks.KeyFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Secret key: {made.secret} (mode 600: keep it on this node; its node config "
          "he-key-file)")
    print(f"Public context for the SuperLink host (its run-config he-public-context): "
          f"{made.public}")
    print(f"Public context fingerprint: {made.public_fingerprint} (every node's `open` "
          "prints it: compare it with each node's operator)")
    for pub, target in made.sealed.items():
        print(f"Sealed for {pub} ({pki.fingerprint(pki.read_node_public_key(pub))}: check "
              f"this fingerprint with that node's operator): {target}")
    print(f"Each sealed file is signed with this node's key {made.signer}. Send each to its node "
          "(any channel: only that node can open it), with this node's public key, which "
          "runs: python -m deploy.he_key open --sealed FILE --from HOLDER.pub --node-key KEY "
          "--out FILE")
    return 0


if __name__ == "__main__":
    sys.exit(main())
