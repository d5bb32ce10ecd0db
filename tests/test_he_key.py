"""The CKKS key made on a node (`deploy.he_key`) and handed to the others sealed to their own
P-384 keys: real `cryptography` keys, real TenSEAL contexts, the printed commands of
`deploy.prepare --he-keys nodes` run as printed."""

from __future__ import annotations

import re
import shlex
import stat
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from deploy import he_key, node_key, pki
from deploy.layout import KEY_IN_FOLDER, KEY_ON_NODE, DeploymentError
from fl_app.protocol import ckks


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory) -> dict[str, Path]:
    """Three nodes' own key pairs, made as `deploy.node_key` makes them: name -> private key."""
    root = tmp_path_factory.mktemp("nodes")
    return {name: node_key.make_key_pair(root / name, name).with_suffix("")
            for name in ("node-0", "node-1", "node-2")}


@pytest.fixture(scope="module")
def generated(tmp_path_factory, nodes) -> Path:
    """node-0's `generate` for node-1 and node-2, through the command line."""
    out = tmp_path_factory.mktemp("holder") / "he"
    argv = ["generate", "--node-key", str(nodes["node-0"]), "--out", str(out),
            "--name", "node-0", "--for", str(nodes["node-1"]) + ".pub",
            str(nodes["node-2"]) + ".pub"]
    assert he_key.main(argv) == 0
    return out


def _pub(private: Path) -> Path:
    """The public key file next to the node's private key file `private`."""
    return private.with_name(private.name + ".pub")


def _open(sealed: Path, key: Path, out: Path, capsys, holder: Path) -> tuple[int, str]:
    """`open` of `sealed` with the node key `key`, which must be signed by the public key
    `holder`; its exit code and stderr."""
    code = he_key.main(["open", "--sealed", str(sealed), "--from", str(holder),
                        "--node-key", str(key), "--out", str(out)])
    return code, capsys.readouterr().err


def test_generate_writes_the_holders_key_the_public_context_and_sealed_copies(generated):
    assert sorted(p.name for p in generated.iterdir()) == [
        "node-0.ckks", "node-1.sealed", "node-2.sealed", "public_context.ckks"]
    assert _mode(generated) == 0o700
    assert all(_mode(path) == 0o600 for path in generated.iterdir())
    # The server's file holds no secret key: it encrypts, but cannot decrypt.
    public = ckks.load_public_context(generated / "public_context.ckks")
    assert not public.is_private()
    import tenseal as ts

    with pytest.raises(ValueError, match="doesn't hold a secret_key"):
        ts.ckks_vector(public, [1.0, 2.0]).decrypt()
    for sealed in ("node-1.sealed", "node-2.sealed"):  # no secret context in the clear
        with pytest.raises(ckks.KeyFileError):
            ckks.secret_context_from((generated / sealed).read_bytes(), sealed)


def test_each_node_opens_its_own_sealed_copy_of_the_holders_key(generated, nodes, tmp_path,
                                                                 capsys):
    for name in ("node-1", "node-2"):
        out = tmp_path / name / "he.ckks"
        code, err = _open(generated / f"{name}.sealed", nodes[name], out, capsys,
                          _pub(nodes["node-0"]))
        assert code == 0, err
        assert _mode(out) == 0o600 and _mode(out.parent) == 0o700
        assert out.read_bytes() == (generated / "node-0.ckks").read_bytes()
        ckks.check_key_pair(generated / "public_context.ckks", out)  # decrypts the server's
    # What one node encrypts, the holder decrypts after the server's sum.
    server = ckks.load_public_context(generated / "public_context.ckks")
    weights = [np.arange(4, dtype=np.float32)]
    reply = ckks.encrypt_update(ckks.load_secret_context(tmp_path / "node-1" / "he.ckks"),
                                weights, 2)
    total = ckks.add_encrypted([ckks.ciphertexts(server, reply, [5])])
    holder = ckks.load_secret_context(generated / "node-0.ckks")
    assert np.allclose(ckks.decrypt_average(holder, total, weights)[0], weights[0], atol=1e-5)


def test_a_sealed_file_opened_with_another_nodes_key_fails_cleanly(generated, nodes, tmp_path,
                                                                   capsys):
    out = tmp_path / "he.ckks"
    code, err = _open(generated / "node-1.sealed", nodes["node-2"], out, capsys,
                      _pub(nodes["node-0"]))
    assert code == 2 and not out.exists()
    assert err.startswith(f"error: {generated / 'node-1.sealed'} was sealed for the node key "
                          "SHA256:"), err
    assert len(err.splitlines()) == 1


def _flipped(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 1]) + data[offset + 1:]


def _resigned(data: bytes, signer: Path) -> bytes:
    """`data`, a sealed file, with its signature replaced by the node key `signer`'s over it."""
    content = data[:-he_key.SIGNATURE_BYTES]
    return content + he_key._sign(content, pki.read_node_private_key(signer))


@pytest.mark.parametrize("where", ["ephemeral key", "nonce", "ciphertext", "tag",
                                   "recipient", "signer", "signature", "truncated",
                                   "ciphertext, signed by the holder"])
def test_a_tampered_sealed_file_fails_cleanly(generated, nodes, tmp_path, capsys, where):
    data = (generated / "node-1.sealed").read_bytes()
    recipient = data.index(b"\n", len(he_key.MAGIC)) + 1  # after the recipient's fingerprint
    body = data.index(b"\n", recipient) + 1  # after the signer's fingerprint
    tag = len(data) - he_key.SIGNATURE_BYTES - 1
    tampered = {
        "ephemeral key": _flipped(data, body + 40),
        "nonce": _flipped(data, body + he_key.POINT_BYTES + 3),
        "ciphertext": _flipped(data, len(data) // 2),
        "tag": _flipped(data, tag),
        "recipient": _flipped(data, recipient - 5),
        "signer": _flipped(data, body - 5),
        "signature": _flipped(data, len(data) - 1),
        "truncated": data[:body + 50],
        # Signed as it is by the holder, but damaged before: the AEAD still refuses it.
        "ciphertext, signed by the holder": _resigned(_flipped(data, tag), nodes["node-0"]),
    }[where]
    sealed, out = tmp_path / "node-1.sealed", tmp_path / "he.ckks"
    sealed.write_bytes(tampered)
    code, err = _open(sealed, nodes["node-1"], out, capsys, _pub(nodes["node-0"]))
    assert code == 2 and not out.exists()
    assert err.startswith(f"error: {sealed} ") and len(err.splitlines()) == 1, err
    expected = {"recipient": "was sealed for the node key", "truncated": "is truncated",
                "ciphertext, signed by the holder": "has been altered or damaged"}
    assert expected.get(where, "is not signed by the key holder's key") in err, err


def test_nothing_is_overwritten_and_bad_inputs_name_the_file(generated, nodes, tmp_path,
                                                             capsys):
    holder = _pub(nodes["node-0"])
    before = (generated / "node-0.ckks").read_bytes()
    assert he_key.main(["generate", "--node-key", str(nodes["node-0"]), "--out",
                        str(generated), "--name", "node-0",
                        "--for", str(nodes["node-1"]) + ".pub"]) == 2
    assert capsys.readouterr().err.startswith(f"error: {generated / 'node-0.ckks'} already "
                                              "exists: refusing to replace it")
    assert (generated / "node-0.ckks").read_bytes() == before
    taken = tmp_path / "taken.ckks"
    taken.write_bytes(b"keep")
    code, err = _open(generated / "node-1.sealed", nodes["node-1"], taken, capsys, holder)
    assert code == 2 and err.startswith(f"error: {taken} already exists")
    assert taken.read_bytes() == b"keep"
    code, err = _open(generated / "node-1.sealed", _pub(nodes["node-1"]),
                      tmp_path / "x.ckks", capsys, holder)  # a public key given as --node-key
    assert code == 2 and str(_pub(nodes["node-1"])) in err, err
    code, err = _open(generated / "node-1.sealed", nodes["node-1"], tmp_path / "x.ckks",
                      capsys, nodes["node-0"])  # the holder's private key given as --from
    assert code == 2 and f"{nodes['node-0']} holds a private key" in err, err
    code, err = _open(generated / "public_context.ckks", nodes["node-1"], tmp_path / "y.ckks",
                      capsys, holder)
    assert code == 2 and "is not a sealed CKKS key file" in err, err
    new = ["generate", "--node-key", str(nodes["node-0"]), "--out", str(tmp_path / "new"),
           "--for"]
    assert he_key.main(new + [str(_pub(nodes["node-1"]))] * 2) == 2
    assert "is the same key as" in capsys.readouterr().err
    assert he_key.main(new + [str(holder)]) == 2
    assert f"--for: {holder} is this node's own key (--node-key)" in capsys.readouterr().err
    new[2] = str(holder)  # a public key given as the holder's --node-key
    assert he_key.main(new + [str(_pub(nodes["node-1"]))]) == 2
    assert f"error: {holder} is not an unencrypted OpenSSH or PEM private key" in (
        capsys.readouterr().err)
    assert not (tmp_path / "new").exists()  # nothing written before the checks


def test_a_key_sealed_by_anyone_but_the_holder_is_refused(generated, nodes, tmp_path, capsys):
    """Whoever has node-1's public key (e.g. the SuperLink operator, who registers it) can
    seal a CKKS key of its own to it: `open --from` the holder's key refuses that file, and
    one whose signature was replaced or altered; the holder's own file opens."""
    holder = _pub(nodes["node-0"])
    intruder = ec.generate_private_key(ec.SECP384R1())
    node_1 = pki.read_node_public_key(_pub(nodes["node-1"]))
    own = ckks.secret_bytes(ckks.new_secret_context())  # the intruder's own CKKS key
    honest = (generated / "node-1.sealed").read_bytes()
    signature = len(honest) - he_key.SIGNATURE_BYTES
    resigned = honest[:signature] + he_key._sign(honest[:signature], intruder)
    cases = {"sealed by another key": he_key.seal(own, node_1, intruder),
             "signature replaced": resigned,
             "signature altered": _flipped(honest, signature + 10),
             "signature cut off": honest[:signature]}
    for case, data in cases.items():
        sealed, out = tmp_path / f"{case}.sealed", tmp_path / f"{case}.ckks"
        sealed.write_bytes(data)
        code, err = _open(sealed, nodes["node-1"], out, capsys, holder)
        assert code == 2 and not out.exists(), case
        assert err.startswith(f"error: {sealed} is not signed by the key holder's key "
                              f"{pki.fingerprint(pki.read_node_public_key(holder))}"), (
            case, err)
        assert len(err.splitlines()) == 1
    # The intruder's file is sound but for the signer: checked against the intruder's own
    # key, it opens (so the refusal above is the signature check, nothing else).
    intruder_pub = tmp_path / "intruder.pub"
    intruder_pub.write_bytes(pki.openssh_public_key(intruder.public_key()))
    code, err = _open(tmp_path / "sealed by another key.sealed", nodes["node-1"],
                      tmp_path / "intruder.ckks", capsys, intruder_pub)
    assert code == 0 and (tmp_path / "intruder.ckks").read_bytes() == own, err


def test_generate_and_open_print_one_public_context_fingerprint(tmp_path, nodes, capsys):
    """Both print the public context's fingerprint, the same on the holder and every node."""
    out = tmp_path / "he"
    assert he_key.main(["generate", "--node-key", str(nodes["node-0"]), "--out", str(out),
                        "--for", str(_pub(nodes["node-1"]))]) == 0
    printed = capsys.readouterr().out
    expected = ckks.context_fingerprint((out / he_key.PUBLIC_CONTEXT_NAME).read_bytes())
    assert re.fullmatch(r"SHA256:([0-9a-f]{4}-){4}[0-9a-f]{4}", expected)
    assert f"Public context fingerprint: {expected} " in printed
    assert he_key.main(["open", "--sealed", str(out / "node-1.sealed"),
                        "--from", str(_pub(nodes["node-0"])), "--node-key",
                        str(nodes["node-1"]), "--out", str(tmp_path / "node-1.ckks")]) == 0
    assert f"Public context fingerprint: {expected} " in capsys.readouterr().out


def _is_secret(path: Path) -> bool:
    """Whether the file at `path` is a TenSEAL context holding a secret key."""
    try:
        return ckks.secret_context_from(path.read_bytes(), str(path)) is not None
    except ckks.KeyFileError:
        return False


def _run_printed(line: str) -> int:
    """Run a printed `python -m deploy.he_key ...` line in this process."""
    argv = shlex.split(line.split(" && ")[-1])
    assert argv[:3] == ["python", "-m", "deploy.he_key"], line
    return he_key.main(argv[3:])


def test_prepare_with_node_held_keys_makes_no_secret_key_and_prints_the_steps(tmp_path, nodes):
    """--node-public-keys: the nodes make the HE key by default; the printed step 0, run as
    printed (each node with its own private key), gives every node the key."""
    from deploy import commands, launch
    from deploy.prepare import instructions, prepare

    keys = tmp_path / "pubs"
    keys.mkdir()
    for name, private in nodes.items():
        (keys / f"{name}.pub").write_bytes(private.with_suffix(".pub").read_bytes())
    dep = prepare(tmp_path / "dep", 3, "homomorphic-encryption='ckks'", ["127.0.0.1"],
                  node_public_keys=keys)
    assert dep.he_key_held_by == KEY_ON_NODE
    secret = [path for path in dep.root.rglob("*") if path.is_file() and _is_secret(path)]
    assert secret == []  # no file of the preparing folder is a secret context
    assert not (dep.root / "he").exists()
    assert commands.he_run_config(dep) == f'he-public-context="{dep.he_public_context}"'
    assert f'he-key-file="{dep.he_key(dep.nodes[1])}"' in commands.node_config(dep,
                                                                                 dep.nodes[1])
    with pytest.raises(DeploymentError, match="private key is held by the node"):
        launch.check_private_keys(dep)
    text = instructions(dep)
    steps = [line for line in text.splitlines() if "-m deploy.he_key" in line]
    assert len(steps) == 3 and "generate" in steps[0]
    assert commands.he_run_config(dep) in text
    # On the nodes, as printed (a node's own key is at keys/node-i on its machine).
    for line, node in zip(steps, nodes):
        assert f"--node-key keys/{node} " in line
        assert _run_printed(line.replace(" keys/", f" {nodes[node].parent}/")) == 0
    for node in dep.nodes:
        ckks.check_key_pair(dep.he_public_context, dep.he_key(node))


def test_prepare_he_keys_choices(tmp_path, capsys):
    """A one-machine trial keeps making the key here (deploy.launch needs it), and says so;
    --he-keys nodes there prints step 0, and launch refuses until it has run."""
    from deploy import launch
    from deploy.prepare import instructions, main, prepare

    dep = prepare(tmp_path / "trial", 2, "homomorphic-encryption='ckks'", ["127.0.0.1"])
    assert dep.he_key_held_by == KEY_IN_FOLDER and dep.he_key(dep.nodes[0]).is_file()
    assert "made here for a one-machine trial" in instructions(dep)
    dep = prepare(tmp_path / "trial", 2, "homomorphic-encryption='ckks'", ["127.0.0.1"],
                  force=True, he_keys="nodes")
    assert not (dep.root / "he").exists()  # the --force'd folder's old key is gone
    with pytest.raises(DeploymentError, match=f"{dep.he_public_context} not found"):
        launch.check_private_keys(dep)
    assert main(["--out", str(tmp_path / "plain"), "--num-nodes", "2",
                 "--he-keys", "nodes"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: --he-keys nodes needs run-config homomorphic-encryption='ckks'")
