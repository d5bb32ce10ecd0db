"""Files and folders of a deployment: private to the account that makes them.

Everything `deploy.prepare` and `deploy.launch` write is created with mode 600 (files) or
700 (folders) from the start, never created wider and narrowed later: node data, keys and
certificates, the manifest, the flwr CLI's connection, the process logs. The Flower
processes they start run with umask 077 (`PRIVATE_UMASK`), so what those write (their
FLWR_HOME, the run's results, a SuperLink state database if one is ever configured) is
private too. Public files (CA certificate, `.pub` keys) are no exception: a deployment
folder is the operator's, and whoever needs a file gets a copy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

PRIVATE_UMASK = 0o077
FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: Path, tighten: bool = True) -> Path:
    """Create `path` and any missing parent with mode 700; return it.

    A `path` that exists already is set to mode 700 when `tighten` (folders that belong to
    the deployment), else left as it is (a folder the user chose, e.g. `--out .`).
    """
    missing = []
    folder = path
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=DIR_MODE)  # the umask can only narrow it
        except FileExistsError:
            pass
    if tighten and path.stat().st_mode & 0o777 != DIR_MODE:
        path.chmod(DIR_MODE)
    return path


def create_private(path: Path, text: bool = False) -> IO:
    """A new file at `path` open for writing, mode 600 from its creation.

    A file already at `path` is removed first: it keeps neither its content nor its mode
    (nor is a hard link to it written through).
    """
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    return os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb")


def append_private(path: Path, text: bool = False) -> IO:
    """`path` open for appending (created if missing), mode 600 (an existing file too)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except OSError:
        os.close(fd)
        raise
    return os.fdopen(fd, "a", encoding="utf-8") if text else os.fdopen(fd, "ab")


def write_private(path: Path, data: bytes | str) -> Path:
    """Write `data` to a new file at `path` (mode 600, see `create_private`); return it."""
    with create_private(path, text=isinstance(data, str)) as file:
        file.write(data)
    return path
