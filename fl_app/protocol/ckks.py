"""CKKS encryption of model updates with TenSEAL: keys, the client's codec, the server's sum.

CKKS (Cheon, Kim, Kim, Song, "Homomorphic Encryption for Arithmetic of Approximate
Numbers", ASIACRYPT 2017) encrypts vectors of reals; anyone holding the *public* context
can add ciphertexts, only the holder of the secret key can decrypt. A client encodes its
weights scaled by its example count, followed by the count itself, as one flat vector
`[n·w_1, ..., n·w_m, n]`, cut into chunks of the context's slot count (poly modulus / 2)
and encrypted chunk by chunk. The server adds the clients' chunks position by position
(`add_encrypted`) and never decrypts; a client decrypts the sum and divides by the summed
count: the weighted average of FedAvg (`decrypt_average`).

Parameters: poly modulus degree 8192 (4096 slots), coefficient moduli of 60, 40 and 60 bits
(160 bits, within the 218 bits HE-standard allows for 128-bit security at N = 8192) and
scale 2^40. Only additions are done, so no relinearization or Galois keys are made. The
decryption error of a sum of k such vectors is about k·1e-8 in absolute terms
(`tests/test_ckks.py` checks the average within 1e-6 relative).

Every reply (and every aggregate a client receives) is checked before use
(`ciphertexts`): one ciphertext per chunk with the expected slot count, at the context's
parameters and first level, at exactly its scale, two polynomials. A ciphertext that fails
is refused with a reason naming the chunk; no error or log line ever quotes a decrypted
value (a server could otherwise send someone's ciphertext and read it back in the error).

The key file a node holds is its serialized context *with* the secret key (0600); the public
context file the server holds is the same context without it (`write_key_pair`), and
`load_public_context` refuses a file that holds a secret key.
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import NDArrays

from fl_app.schema import ConfigError

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 40, 60)
SCALE_BITS = 40
SLOTS = POLY_MODULUS_DEGREE // 2
MAX_ENCODED = 2.0 ** 50  # largest |n·w| a client encrypts (`encodable`)
KEY_FILE_NODE_CONFIG = "he-key-file"  # node config: path to the node's secret context file
PUBLIC_CONTEXT_FILE = "he_public_context.bin"
SECRET_CONTEXT_FILE = "he_secret_context.bin"
TENSOR_TYPE = "ckks.chunks"  # Parameters.tensor_type of an encrypted aggregate (server side)


class KeyFileError(ConfigError):
    """A context file is missing, unreadable, or holds the wrong kind of key."""


def _tenseal() -> Any:
    """The `tenseal` module (`fl_app/__init__.py` loads it before TensorFlow, see there)."""
    if "tenseal" not in sys.modules and "tensorflow" in sys.modules:
        raise RuntimeError("TenSEAL must be imported before TensorFlow (both bundle protobuf; "
                           "loaded after it, TenSEAL cannot serialize): import fl_app first")
    try:
        import tenseal
    except ImportError as err:  # an optional extra
        raise KeyFileError("homomorphic-encryption=ckks needs TenSEAL: "
                           "pip install -e '.[he]'") from err
    return tenseal


def new_secret_context() -> Any:
    """A fresh CKKS context holding a new secret key (for the nodes only)."""
    ts = _tenseal()
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, POLY_MODULUS_DEGREE,
                     coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES))
    ctx.global_scale = 2.0 ** SCALE_BITS
    return ctx


def public_bytes(ctx: Any) -> bytes:
    """`ctx` serialized without its secret key (what the server may hold)."""
    return ctx.serialize(save_secret_key=False, save_galois_keys=False, save_relin_keys=False)


def context_fingerprint(public: bytes) -> str:
    """A short fingerprint of the public context serialized in `public` (`public_bytes`):
    SHA-256, its first 80 bits in hex, for operators to compare that all hold one key."""
    digest = hashlib.sha256(public).hexdigest()[:20]
    return "SHA256:" + "-".join(digest[i:i + 4] for i in range(0, len(digest), 4))


def secret_bytes(ctx: Any) -> bytes:
    """`ctx` serialized with its secret key (what a node holds)."""
    return ctx.serialize(save_secret_key=True, save_galois_keys=False, save_relin_keys=False)


def write_new(path: Path, data: bytes) -> Path:
    """Write `data` to a new file created with mode 0600 (never readable by others); an
    existing file or link at `path` is never written through (FileExistsError)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
    return path


def write_key_pair(public_path: Path, secret_path: Path) -> None:
    """Make a new key and write the public context and the secret context (both 0600,
    neither may exist yet)."""
    ctx = new_secret_context()
    write_new(Path(public_path), public_bytes(ctx))
    write_new(Path(secret_path), secret_bytes(ctx))


def _context_from(data: bytes, what: str) -> Any:
    """The TenSEAL context serialized in `data`; KeyFileError naming `what` if it is none."""
    try:
        return _tenseal().context_from(data)
    except KeyFileError:
        raise
    except Exception as err:  # TenSEAL raises bare ValueError/RuntimeError on bad bytes
        raise KeyFileError(f"{what} is not a TenSEAL context") from err


def _read_context(path: str | Path, what: str) -> Any:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise KeyFileError(f"{what} {str(path)!r} cannot be read: {err.strerror}") from err
    return _context_from(data, f"{what} {str(path)!r}")


def secret_context_from(data: bytes, what: str) -> Any:
    """The secret context serialized in `data` (`what` names it in errors); KeyFileError
    unless it is a TenSEAL context holding a secret key."""
    ctx = _context_from(data, what)
    if not ctx.is_private():
        raise KeyFileError(f"{what} holds no secret key")
    return ctx


def load_public_context(path: str | Path) -> Any:
    """The server's context from `path`; refuses one that holds a secret key."""
    if not str(path):
        raise KeyFileError("homomorphic-encryption=ckks needs run-config key he-public-context: "
                           "the public context file (deploy.prepare writes it)")
    ctx = _read_context(path, "he-public-context")
    if ctx.is_private():
        raise KeyFileError(f"he-public-context {str(path)!r} holds a secret key: the server must "
                        "get only the public context (deploy.prepare writes it)")
    return ctx


def load_secret_context(path: str | Path) -> Any:
    """A node's context from its key file; refuses one without a secret key."""
    ctx = _read_context(path, f"node config {KEY_FILE_NODE_CONFIG}")
    if not ctx.is_private():
        raise KeyFileError(f"node config {KEY_FILE_NODE_CONFIG} {str(path)!r} holds no secret "
                        "key (that is the server's public context)")
    return ctx


def check_key_pair(public_path: str | Path, secret_path: str | Path) -> None:
    """Raise KeyFileError unless the secret context decrypts what the public context
    encrypts (the two files were made together)."""
    public, secret = load_public_context(public_path), load_secret_context(secret_path)
    probe = [1.0, -2.0, 0.5]
    vector = _tenseal().ckks_vector(public, probe)
    vector.link_context(secret)
    try:
        decrypted = vector.decrypt()[:len(probe)]
    except Exception:  # TenSEAL raises bare ValueError/RuntimeError on mismatched parameters
        decrypted = []
    if len(decrypted) != len(probe) or not np.allclose(decrypted, probe, atol=1e-3):
        raise KeyFileError(f"he-public-context {str(public_path)!r} and the key file "
                           f"{str(secret_path)!r} are not one key pair: give the public context "
                           "made with that key (deploy.prepare writes both), or give neither "
                           "and run_simulation.py makes a fresh pair")


class CountError(ValueError):
    """The decrypted example count of an aggregate is not a positive count: it was forged
    (e.g. a client's reply with its count shifted by a plaintext), since an honest sum's
    count is an integer of at least 1. Its message never holds a decrypted value."""


def num_chunks(num_values: int) -> int:
    """How many ciphertexts carry `num_values` weights plus the count."""
    return math.ceil((num_values + 1) / SLOTS)


def chunk_sizes(num_values: int) -> list[int]:
    """The number of slots used in each ciphertext for `num_values` weights plus the count."""
    total = num_values + 1
    return [min(SLOTS, total - start) for start in range(0, total, SLOTS)]


def encodable(weights: NDArrays, num_examples: int) -> bool:
    """Whether `encrypt_update` takes these weights: every `n·w` finite and at most
    `MAX_ENCODED` in size (far above any trained model's, far below what CKKS cannot encode
    or decrypt at this scale), so that the check, not TenSEAL, refuses them."""
    return all(bool(np.all(np.isfinite(w)))
               and float(np.max(np.abs(np.asarray(w, dtype=np.float64)), initial=0.0))
               * num_examples <= MAX_ENCODED for w in weights)


def encrypt_update(ctx: Any, weights: NDArrays, num_examples: int) -> NDArrays:
    """The client's reply: `[n·weights..., n]` encrypted in chunks, each a uint8 array of
    its serialized ciphertext."""
    ts = _tenseal()
    flat = np.concatenate([np.asarray(w, dtype=np.float64).ravel() for w in weights]
                          + [np.ones(1)]) * float(num_examples)
    return [np.frombuffer(ts.ckks_vector(ctx, flat[start:start + SLOTS]).serialize(),
                          dtype=np.uint8)
            for start in range(0, flat.size, SLOTS)]


def ciphertexts(ctx: Any, arrays: NDArrays, sizes: Sequence[int]) -> list[Any]:
    """Deserialize one reply's chunks under `ctx`; ValueError unless there is one ciphertext
    per expected chunk, each with the expected number of slots and addable to fresh
    ciphertexts of `ctx` (`parameter_problem`)."""
    ts = _tenseal()
    if len(arrays) != len(sizes):
        raise ValueError(f"{len(arrays)} ciphertexts, expected {len(sizes)}")
    out = []
    for i, (array, size) in enumerate(zip(arrays, sizes)):
        array = np.asarray(array)
        if array.dtype != np.uint8 or array.ndim != 1:
            raise ValueError(f"chunk {i} is {array.dtype} of shape {array.shape}, not bytes")
        try:
            vector = ts.ckks_vector_from(ctx, array.tobytes())
        except Exception as err:  # TenSEAL raises bare exceptions on bad bytes
            raise ValueError(f"chunk {i} is not a CKKS ciphertext of this context") from err
        if vector.size() != size:
            raise ValueError(f"chunk {i} holds {vector.size()} values, expected {size}")
        problem = parameter_problem(ctx, vector)
        if problem:
            raise ValueError(f"chunk {i} {problem}")
        out.append(vector)
    return out


def parameter_problem(ctx: Any, vector: Any) -> str | None:
    """Why `vector` cannot be added to fresh ciphertexts of `ctx`, or None if it can.

    A fresh encryption under `ctx` is one SEAL ciphertext of two polynomials in NTT form, at
    the context's first data level (its `parms_id`: poly modulus degree and coefficient
    moduli) and at exactly its global scale; a sum of such ciphertexts is too. Anything else
    (another scale, a lower level after a rescale, a product never relinearized) would make
    TenSEAL's addition raise or change the sum's level, so it is refused here, per reply.
    Reads only metadata, never decrypts.
    """
    parts = vector.ciphertext()
    if len(parts) != 1:
        return f"holds {len(parts)} ciphertexts, expected 1"
    cipher = parts[0]
    if list(cipher.parms_id()) != list(ctx.seal_context().data.first_parms_id()):
        return (f"is encrypted under other parameters or at another level "
                f"({cipher.coeff_modulus_size()} coefficient moduli of poly modulus degree "
                f"{cipher.poly_modulus_degree()}, expected {len(COEFF_MOD_BIT_SIZES) - 1} of "
                f"{POLY_MODULUS_DEGREE})")
    if cipher.scale != ctx.global_scale:
        return (f"is at scale 2^{math.log2(cipher.scale):.4g}, expected "
                f"2^{math.log2(ctx.global_scale):.4g}")
    if cipher.size() != 2 or not cipher.is_ntt_form():
        return f"is not a fresh ciphertext ({cipher.size()} polynomials, expected 2)"
    return None


def add_encrypted(replies: Sequence[list[Any]]) -> NDArrays:
    """The position-wise sum of deserialized replies (`ciphertexts`), serialized as uint8
    arrays. Needs no secret key."""
    if not replies:
        raise ValueError("nothing to add")
    total = list(replies[0])
    for reply in replies[1:]:
        total = [a + b for a, b in zip(total, reply, strict=True)]
    return [np.frombuffer(vector.serialize(), dtype=np.uint8) for vector in total]


def decrypt_average(ctx: Any, arrays: NDArrays, reference: NDArrays) -> NDArrays:
    """Decrypt an encrypted sum and divide by its count: the weighted average, shaped and
    typed like `reference` (the model's weights). ValueError if it does not fit (`CountError`
    if its count is not a positive count); its message never holds a decrypted value."""
    num_values = sum(int(np.asarray(r).size) for r in reference)
    vectors = ciphertexts(ctx, arrays, chunk_sizes(num_values))
    flat = np.concatenate([np.asarray(v.decrypt(), dtype=np.float64) for v in vectors])
    count = flat[-1]
    if not count > 0.5:  # counts are integers >= 1; CKKS error is far below 0.5
        # Never quote a decrypted value: a server that sends someone's ciphertext as the
        # aggregate would read it back in the error reply (a decryption oracle).
        raise CountError("the encrypted aggregate's example count is not a positive count")
    average, start = [], 0
    for ref in reference:
        ref = np.asarray(ref)
        average.append((flat[start:start + ref.size] / count).reshape(ref.shape)
                       .astype(ref.dtype))
        start += ref.size
    return average
