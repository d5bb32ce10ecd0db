"""TLS certificates and SuperNode authentication keys, made with `cryptography`.

* A self-signed CA, and a server certificate signed by it for the SuperLink's host names
  plus the loopback names (the SuperLink serves its Fleet, Control and Runtime APIs over
  HTTPS with it; SuperNodes and the `flwr` CLI verify it against the CA, and so do the
  SuperLink's own SuperExec and ServerApp processes, which dial 127.0.0.1 or ::1 when the
  SuperLink binds 0.0.0.0 or ::).
* One ECDSA P-384 key pair per SuperNode: the private key in OpenSSH format for
  `flower-supernode --auth-supernode-private-key`, the public key in OpenSSH format for
  `flwr supernode register` (what `ssh-keygen -t ecdsa -b 384` writes). Made here for a
  one-machine trial, or by each node on its own machine (`deploy.node_key`): then only its
  public key reaches the operator, read back and checked by `read_node_public_key`.

Every file is created with mode 600 (never readable by others, not even briefly), in a
folder of mode 700: the private keys above all, and the public ones too (`deploy.files`).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from deploy import files

VALIDITY = dt.timedelta(days=365)
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class TlsFiles:
    """Where the CA certificate and the SuperLink's certificate and key were written."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def _write(path: Path, data: bytes) -> Path:
    """Write `data` to a new file at `path`, mode 600 from its creation, in a mode-700 folder."""
    files.private_dir(path.parent)
    return files.write_private(path, data)


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _subject_alt_names(hosts: list[str]) -> x509.SubjectAlternativeName:
    """`hosts` and the loopback names, each once, in that order."""
    names: list[x509.GeneralName] = []
    for name in map(_general_name, [*hosts, *LOOPBACK]):
        if name not in names:
            names.append(name)
    return x509.SubjectAlternativeName(names)


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a TLS server signs handshakes and (RSA) decrypts
    key exchanges."""
    return x509.KeyUsage(digital_signature=True, key_encipherment=not signs_certificates,
                         key_cert_sign=signs_certificates, crl_sign=signs_certificates,
                         content_commitment=False, data_encipherment=False,
                         key_agreement=False, encipher_only=False, decipher_only=False)


def _certificate(subject: x509.Name, key: rsa.RSAPrivateKey, issuer: x509.Name,
                 issuer_key: rsa.RSAPrivateKey) -> x509.CertificateBuilder:
    """A certificate builder with the fields and key identifiers every certificate here has."""
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    )


def make_tls(out_dir: Path, hosts: list[str]) -> TlsFiles:
    """Write a CA (`ca.crt`) and a server certificate/key for `hosts` into `out_dir`.

    The certificate is valid for `hosts` (the first is its common name) and always for
    127.0.0.1, ::1 and localhost too.
    """
    if not hosts:
        raise ValueError("the server certificate needs at least one host name or IP address")
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fl-keras deployment CA")])
    ca_cert = (
        _certificate(ca_name, ca_key, ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    server_cert = (
        _certificate(server_name, server_key, ca_name, ca_key)
        .add_extension(_subject_alt_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return TlsFiles(
        ca_cert=_write(out_dir / "ca.crt", ca_cert.public_bytes(pem)),
        server_cert=_write(out_dir / "server.pem", server_cert.public_bytes(pem)),
        server_key=_write(out_dir / "server.key", _key_pem(server_key)),
    )


def make_node_keys(private_path: Path, tighten: bool = True) -> Path:
    """Write a SuperNode's ECDSA P-384 key pair (OpenSSH format); return the `.pub` path.

    Both files are mode 600 from their creation; their folder is created mode 700 if
    missing, and an existing one is set to 700 only when `tighten` (`files.private_dir`).
    """
    key = ec.generate_private_key(ec.SECP384R1())
    files.private_dir(private_path.parent, tighten=tighten)
    files.write_private(private_path, key.private_bytes(serialization.Encoding.PEM,
                                                        serialization.PrivateFormat.OpenSSH,
                                                        serialization.NoEncryption()))
    return files.write_private(private_path.with_name(private_path.name + ".pub"),
                               openssh_public_key(key.public_key()))


def openssh_public_key(key: ec.EllipticCurvePublicKey) -> bytes:
    """`key` as one OpenSSH public key line (`ecdsa-sha2-nistp384 AAAA...`, no comment)."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """The key's SHA256 fingerprint as `ssh-keygen -lf` prints it (`SHA256:...`): node and
    operator compare it to check that the public key handed over arrived unchanged."""
    blob = base64.b64decode(openssh_public_key(key).split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def read_node_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """The SuperNode public key in the OpenSSH file at `path`.

    Raises `ValueError`, naming `path`, unless it is one ECDSA P-384 public key (a missing
    file, a private key, another key type or curve, or anything unparsable).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path} not found") from None
    except OSError as err:
        raise ValueError(f"{path} cannot be read: {err.strerror}") from None
    if b"PRIVATE KEY" in data:
        raise ValueError(f"{path} holds a private key: a node hands over only its public "
                         "key (the `.pub` file); it should make a new key pair, since this "
                         "one has left its machine")
    try:
        key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ValueError(f"{path} is not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve,
                                                                         ec.SECP384R1):
        kind = (f"ECDSA {key.curve.name}" if isinstance(key, ec.EllipticCurvePublicKey)
                else type(key).__name__.removesuffix("PublicKey"))
        raise ValueError(f"{path} is not an ECDSA P-384 public key but {kind} (make one "
                         "with `ssh-keygen -t ecdsa -b 384` or `python -m deploy.node_key`)")
    return key


def read_node_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The SuperNode private key in the file at `path` (OpenSSH or PEM, unencrypted).

    Raises `ValueError`, naming `path`, unless it is one ECDSA P-384 private key.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{path} cannot be read: {err.strerror or err}") from None
    loaders = (serialization.load_ssh_private_key, serialization.load_pem_private_key)
    for load in loaders:
        try:
            key = load(data, password=None)
            break
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    else:
        raise ValueError(f"{path} is not an unencrypted OpenSSH or PEM private key (this "
                         "node's key from `python -m deploy.node_key`)")
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve,
                                                                          ec.SECP384R1):
        raise ValueError(f"{path} is not an ECDSA P-384 private key (the node's key from "
                         "`python -m deploy.node_key`)")
    return key
