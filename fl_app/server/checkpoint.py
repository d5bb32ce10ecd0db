"""Crash-safe checkpoints: after every round, everything needed to continue the run.

A checkpoint is one file, `checkpoint.npz` in the run's output folder, replaced atomically
(temporary file, fsync, rename) after every round, so a crash at any moment leaves the
previous or the new checkpoint, never a torn one. It holds the global weights, the round
number, the server state (strategy state such as FedOpt moments or a privacy accountant,
the client sampler's RNG, the stopping rules) and the run's history so far, plus the
resolved run config it was written with.

Under DP, `privacy_ledger.json` beside it holds every round the accountant charged. It
is written as soon as a round is aggregated, before anything of the round (the model to
the evaluation clients, history.json, the checkpoint) leaves the server, so a crash
between a round's release and its checkpoint cannot make a resume forget the charge.

Resuming (`resume-from`, `run_simulation.py --resume DIR`) continues after the last
complete round, with the ledger's charges. A missing, corrupt or mismatched checkpoint (other
model shapes, other config) raises `CheckpointError` with what is wrong; a run never silently
starts afresh.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.common import NDArrays, Parameters, parameters_to_ndarrays

from fl_app.schema import RunConfig, Scalar
from fl_app.server.outputs import atomic_write_bytes

CHECKPOINT_FILE = "checkpoint.npz"
LEDGER_FILE = "privacy_ledger.json"
FORMAT_VERSION = 1
# Keys that may differ between the interrupted run and its continuation: where results
# go, how many rounds to run in total, how long a round waits for its clients, and the
# privacy budget (a run stopped by `max-epsilon` continues under a larger one), and what
# the run shows and logs besides its results (console, TensorBoard).
RESUMABLE_CHANGES = frozenset({"out-dir", "resume-from", "num-server-rounds", "round-timeout",
                               "max-epsilon", "verbose", "tensorboard"})
_META = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit the run resuming from it."""


@dataclass
class Checkpoint:
    """The state of a run after its last complete round."""

    round: int
    weights: NDArrays
    server_state: dict[str, Any]
    history: dict[str, Any]
    config: dict[str, Scalar]


def _pack(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """A JSON-able copy of `value`; numpy arrays move to `arrays`, leaving a reference."""
    if isinstance(value, np.ndarray):
        name = f"a{len(arrays)}"
        arrays[name] = value
        return {"__array__": name}
    if isinstance(value, Mapping):
        return {str(k): _pack(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_pack(v, arrays) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _unpack(value: Any, arrays: Mapping[str, np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__array__"}:
            return arrays[value["__array__"]]
        return {k: _unpack(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_unpack(v, arrays) for v in value]
    return value


def checkpoint_path(folder: str | Path) -> Path:
    """The checkpoint file of a run's output folder."""
    return Path(folder).expanduser().resolve() / CHECKPOINT_FILE


def save_checkpoint(folder: str | Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` atomically into `folder`; return the file's path."""
    arrays: dict[str, np.ndarray] = {}
    meta = _pack({"format": FORMAT_VERSION, "round": checkpoint.round,
                  "weights": list(checkpoint.weights), "server_state": checkpoint.server_state,
                  "history": checkpoint.history, "config": dict(checkpoint.config)}, arrays)
    buffer = io.BytesIO()
    # (Typed Any: numpy's stub matches a ** mapping of arrays against `allow_pickle: bool`.)
    members: dict[str, Any] = {
        **arrays, _META: np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
    np.savez(buffer, **members)
    path = checkpoint_path(folder)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """Read the checkpoint of the run in `folder`; CheckpointError if absent or corrupt."""
    path = checkpoint_path(folder)
    if not path.is_file():
        raise CheckpointError(f"cannot resume: no checkpoint at {path} (was the folder written by "
                              "a run of this app, and did it complete at least round 0?)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            stored = {name: npz[name] for name in npz.files}
        meta = json.loads(stored.pop(_META).tobytes().decode("utf-8"))
        tree = _unpack(meta, stored)
        if tree["format"] != FORMAT_VERSION:
            raise CheckpointError(f"checkpoint {path} has format {tree['format']}, this version "
                                  f"reads format {FORMAT_VERSION}")
        return Checkpoint(int(tree["round"]), tree["weights"], tree["server_state"],
                          tree["history"], tree["config"])
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"checkpoint {path} is corrupt and cannot be resumed from: "
                              f"{type(err).__name__}: {err}") from err


def config_differences(saved: Mapping[str, Scalar], current: Mapping[str, Scalar],
                       defaults: Mapping[str, Scalar]) -> list[str]:
    """Keys (outside `RESUMABLE_CHANGES`) whose value differs; a key the checkpoint lacks
    (added to the schema later) counts as holding its default."""
    return [f"'{key}': checkpoint {saved.get(key, defaults.get(key))!r}, now {value!r}"
            for key, value in current.items()
            if key not in RESUMABLE_CHANGES and saved.get(key, defaults.get(key)) != value]


def check_resumable(checkpoint: Checkpoint, cfg: Mapping[str, Scalar],
                    defaults: Mapping[str, Scalar], model_weights: NDArrays,
                    source: str | Path) -> None:
    """Raise CheckpointError unless `checkpoint` was written by this config and model."""
    path = checkpoint_path(source)
    differences = config_differences(checkpoint.config, cfg, defaults)
    unknown = sorted(set(checkpoint.config) - set(cfg))
    differences += [f"'{key}': only in the checkpoint" for key in unknown]
    if differences:
        raise CheckpointError(f"checkpoint {path} was written with a different run config; "
                              f"resume with the same values or start a new run: "
                              f"{'; '.join(differences)}")
    saved = [(w.shape, w.dtype) for w in checkpoint.weights]
    expected = [(w.shape, w.dtype) for w in model_weights]
    if saved != expected:
        raise CheckpointError(f"checkpoint {path} holds {len(saved)} weight arrays "
                              f"{[(s, str(d)) for s, d in saved]}, the model has {len(expected)} "
                              f"{[(s, str(d)) for s, d in expected]}")
    if checkpoint.round > int(cfg["num-server-rounds"]):
        raise CheckpointError(f"checkpoint {path} is at round {checkpoint.round}, beyond "
                              f"num-server-rounds={cfg['num-server-rounds']}")


def load_for_resume(cfg: RunConfig, model_weights: NDArrays) -> Checkpoint | None:
    """The checkpoint named by `resume-from`, checked against this run (None if not set)."""
    source = str(cfg["resume-from"])
    if not source:
        return None
    checkpoint = load_checkpoint(source)
    check_resumable(checkpoint, cfg, cfg.schema.defaults(), model_weights, source)
    return checkpoint


def write_ledger(folder: str | Path, ledger: dict[str, Any]) -> Path:
    """Write the privacy ledger atomically (mode 0600) into `folder`; return its path."""
    path = Path(folder).expanduser().resolve() / LEDGER_FILE
    atomic_write_bytes(path, json.dumps(ledger).encode("utf-8"))
    return path


def read_ledger(folder: str | Path) -> dict[str, Any] | None:
    """The privacy ledger a run left in `folder` (None if it kept none); CheckpointError
    if it is unreadable."""
    path = Path(folder).expanduser().resolve() / LEDGER_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"privacy ledger {path} is corrupt: {err}; without it the "
                              "rounds it charged would be forgotten") from err


class Checkpointer:
    """The server's per-round checkpoint callback: writes `checkpoint.npz` into `out_dir`."""

    def __init__(self, cfg: Mapping[str, Scalar], out_dir: Path,
                 history: Callable[[], dict[str, Any]]) -> None:
        self.config = dict(cfg)
        self.out_dir = out_dir
        self.history = history

    def __call__(self, server_round: int, parameters: Parameters,
                 server_state: dict[str, Any]) -> None:
        """Save the run as of the end of `server_round`."""
        save_checkpoint(self.out_dir, Checkpoint(server_round, parameters_to_ndarrays(parameters),
                                                 server_state, self.history(), self.config))

    def save_ledger(self, ledger: dict[str, Any]) -> None:
        """Persist the privacy ledger (called before anything of a charged round is released)."""
        write_ledger(self.out_dir, ledger)
