"""What a run leaves behind: history.json (written atomically every round) and plots, all
created 0600 in a 0700 folder."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

HISTORY_FILE = "history.json"
MODEL_FILE = "final_model.keras"
ENCRYPTED_MODEL_FILE = "final_model.ckks.npz"  # homomorphic encryption: the sum, encrypted


def resolve_out_dir(configured: str) -> Path:
    """The run's output folder: `out-dir` if set, else outputs/<timestamp> under the cwd."""
    if configured:
        return Path(configured).expanduser().resolve()
    return (Path.cwd() / "outputs" / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()


@contextmanager
def private_files() -> Iterator[None]:
    """Files and folders created inside are 0600/0700 (umask 077), for writers that take
    only a path (Keras' `model.save`, matplotlib's `savefig`)."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader never sees a half-written file (tmp, fsync, rename)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically, as `atomic_write_bytes` does."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_history(out_dir: Path, history: dict[str, Any]) -> Path:
    """Write history.json atomically; return its path."""
    path = out_dir / HISTORY_FILE
    atomic_write_text(path, json.dumps(history, indent=2, sort_keys=False))
    return path


def read_history(out_dir: Path) -> dict[str, Any]:
    """Read a run's history.json."""
    return json.loads((out_dir / HISTORY_FILE).read_text(encoding="utf-8"))


def metric_names(rounds: list[dict[str, Any]], section: str) -> list[str]:
    """The metrics a section records in any round (first-seen order, loss last), without
    the server's client counts (`num_*`)."""
    names: dict[str, None] = {}
    for record in rounds:
        for name, value in record.get(section, {}).items():
            if (isinstance(value, (int, float)) and not isinstance(value, bool)
                    and not name.startswith("num_")):
                names.setdefault(name)
    return [*(n for n in names if n != "loss"), *(["loss"] if "loss" in names else [])]


def _series(rounds: list[dict[str, Any]], section: str, metric: str) -> tuple[list, list]:
    points = [(r["round"], r[section][metric]) for r in rounds
              if metric in r.get(section, {})]
    return [p[0] for p in points], [p[1] for p in points]


# What each curve of a metric's plot shows: (section, name prefix, legend).
CURVES = (("centralized", "", "centralized: server's held-out test set"),
          ("distributed", "", "distributed: clients' validation data"),
          ("fit", "train_", "clients' training: fit metrics averaged over clients"))
PRIVACY_CURVES = (("privacy", "", "spent so far (accountant)"),)
BYTES_CURVES = (("bytes", "up", "up: clients' updates (serialized)"),
                ("bytes", "down", "down: the model broadcast (serialized)"))


def plot_curves(rounds: list[dict[str, Any]], metric: str,
                specs: tuple[tuple[str, str, str], ...]) -> list[tuple[str, list, list]]:
    """(legend, rounds, values) of each curve in `specs` that has values."""
    curves = [(label, *_series(rounds, section, prefix + metric))
              for section, prefix, label in specs]
    return [curve for curve in curves if curve[1]]


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_figure(metric: str, curves: list[tuple[str, list, list]], context: str) -> Any:
    """A matplotlib figure of `curves` per round: integer round ticks, `context` under the
    title, a legend naming what each curve is evaluated on."""
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, xs, ys in curves:
        ax.plot(xs, ys, marker="o", label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per round" + (f"\n{context}" if context else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_plots(out_dir: Path, rounds: list[dict[str, Any]], context: str = "") -> list[Path]:
    """Plot every evaluated metric per round (`<metric>.png`: centralized, distributed and
    the clients' training curve `train_<metric>`), the parameter bytes sent up and down
    (`bytes.png`) and ε (`privacy.png`) if recorded, with
    integer round ticks, `context` (strategy, dataset, clients) in the titles and legends
    that say what each curve is evaluated on."""
    plt = _pyplot()
    names = dict.fromkeys([*metric_names(rounds, "centralized"),
                           *metric_names(rounds, "distributed")])
    # (file name, y-axis label, the key's name, curves)
    panels = [*((name, name, name, CURVES) for name in names),
              ("bytes", "bytes", "", BYTES_CURVES),
              ("privacy", "epsilon", "epsilon", PRIVACY_CURVES)]
    written = []
    for file_name, ylabel, metric, specs in panels:
        curves = plot_curves(rounds, metric, specs)
        if not curves:
            continue
        fig = plot_figure(ylabel, curves, context)
        path = out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', file_name)}.png"
        with private_files():
            fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
