"""The SuperExec secret's file: private to the account that runs the node, checked on read.

A SuperNode started with `--isolation process --superexec-auth-secret-file FILE` lets only
a process that signs with the secret in FILE take its tasks (`fl_app.worker.task_api`). The
file is this module's: made whole (never half-written) with mode 600 in a folder of mode
700, never through a symlink, and refused when another account owns it or may read it.
This module imports nothing of the deploy tooling (a higher layer).
"""

from __future__ import annotations

import os
import secrets
import stat
import tempfile
from pathlib import Path

MIN_SECRET_CHARS = 32


class SecretFileError(RuntimeError):
    """The secret's file or folder is missing, empty or open to other accounts."""


def _refuse_foreign(path: Path, info: os.stat_result) -> None:
    """Refuse a file or folder that another account owns (it could know the secret)."""
    if info.st_uid != os.geteuid():
        raise SecretFileError(f"{path} belongs to uid {info.st_uid}, not to this account "
                              f"({os.geteuid()}): remove it or choose another path")


def private_dir(path: Path) -> Path:
    """`path` as a folder of mode 700 that this account owns and that is not a symlink:
    created (parents too) if missing; an existing folder open to other accounts is refused,
    not changed (it may be the user's home or another shared folder)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        raise SecretFileError(f"folder {path} is a symlink: use a real folder")
    _refuse_foreign(path, info)
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise SecretFileError(f"folder {path} (mode {stat.S_IMODE(info.st_mode):o}) is open "
                              "to other accounts: keep the secret in a folder of its own "
                              "(it is created with mode 700)")
    return path


def ensure_secret(path: Path) -> bytes:
    """The secret in `path`; a new random one if there is none, written whole to a mode-600
    temporary file and linked into place (a crash never leaves an empty secret behind)."""
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(secrets.token_hex(32))
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass  # made already: read that one
    finally:
        os.unlink(tmp)
    return read_secret(path)


def read_secret(path: Path) -> bytes:
    """The secret in `path` (its exact bytes, as Flower's SuperNode reads them); refused if
    others than its owner may read or write the file, or it holds too few characters."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as err:
        raise SecretFileError(f"cannot read the secret file {path}: {err.strerror}") from err
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        _refuse_foreign(path, info)
        mode = stat.S_IMODE(info.st_mode)
        if mode & 0o077:
            raise SecretFileError(f"secret file {path} has mode {mode:03o}: it must be "
                                  "readable by its owner only (chmod 600)")
        secret = file.read()
    if len(secret.strip()) < MIN_SECRET_CHARS:
        raise SecretFileError(f"secret file {path} holds no secret (at least "
                              f"{MIN_SECRET_CHARS} characters)")
    return secret
