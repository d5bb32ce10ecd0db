"""history.json's `summary`: the final and best value of every metric (with its round),
how long the run and its start-up took, how many rounds ran, why it stopped, and the
library versions it ran with."""

from __future__ import annotations

import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from fl_app.server.outputs import metric_names
from fl_app.server.stopping import resolve_mode

# Sections summarized: the server's test set, the clients' validation data, and the
# clients' training metrics (aggregated fit metrics, `train_<name>`).
SECTIONS = ("centralized", "distributed", "fit")


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    """The versions of Flower, TensorFlow, Keras and Python this run used."""
    import keras
    import tensorflow as tf

    return {"flwr": _version("flwr"), "tensorflow": tf.__version__,
            "keras": keras.__version__, "python": platform.python_version()}


def _metric(rounds: list[dict[str, Any]], section: str, name: str, mode: str) -> dict[str, Any]:
    points = [(r["round"], float(r[section][name])) for r in rounds
              if name in r.get(section, {})]
    pick = max if mode == "max" else min
    best_round, best = pick(points, key=lambda point: point[1])  # the earliest best
    final_round, final = points[-1]
    return {"final": final, "final_round": final_round, "best": best,
            "best_round": best_round, "mode": mode}


def _names(rounds: list[dict[str, Any]], section: str) -> list[str]:
    names = metric_names(rounds, section)
    if section == "fit":  # the clients' training metrics only (not train_seconds, counts)
        evaluated = {*metric_names(rounds, "centralized"), *metric_names(rounds, "distributed")}
        names = [n for n in names if n.removeprefix("train_") in evaluated
                 and n.startswith("train_")]
    return names


def metric_summary(rounds: list[dict[str, Any]],
                   directions: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Per section, per metric: the final and the best value and their rounds (best by the
    metric's direction, as `mode=auto` resolves it; the earliest round on a tie)."""
    summary = {}
    for section in SECTIONS:
        metrics = {name: _metric(rounds, section, name,
                                 resolve_mode(name.removeprefix("train_"), "auto", directions))
                   for name in _names(rounds, section)}
        if metrics:
            summary[section] = metrics
    return summary


def run_summary(history: Mapping[str, Any], *, startup_seconds: float | None,
                total_seconds: float, directions: Mapping[str, str] | None = None
                ) -> dict[str, Any]:
    """The `summary` block of a finished run's history."""
    rounds = history["rounds"]
    return {"stopped": history["stopped"],
            "rounds_run": sum(1 for r in rounds if r["round"] > 0),
            "last_round": rounds[-1]["round"] if rounds else None,
            "total_seconds": total_seconds, "startup_seconds": startup_seconds,
            "metrics": metric_summary(rounds, directions),
            "versions": library_versions()}
