"""Every round's numbers as flat scalars: the CSV log (`history.csv`, one row per round, as
Keras' `CSVLogger` writes one per epoch) and the tags of the TensorBoard writer.

The scalars come from the round record generically, so a field added to the record later
shows up without a change here: every numeric leaf of every section, named by its path
(`centralized/accuracy`, `fit/num_sampled`, `privacy/epsilon`, `bytes/up`, `seconds`).
Left out: `round` (the step), booleans, lists (`fit.failures`) and each client's own
data-quality report (`fit.data_quality`) and evaluation (`client_evaluations`), by client id:
not a series over rounds (their spread, `fairness`, is).
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from fl_app.server.outputs import atomic_write_text

CSV_FILE = "history.csv"
NOT_SERIES = {"round", "data_quality", "client_evaluations"}


def _leaves(value: Any, path: str) -> dict[str, float]:
    if isinstance(value, dict):
        found: dict[str, float] = {}
        for key, item in value.items():
            if key not in NOT_SERIES:
                found.update(_leaves(item, f"{path}/{key}" if path else str(key)))
        return found
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {path: float(value)}
    return {}


def round_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric leaves by path, in the record's order (`round` left out)."""
    return _leaves(record, "")


def csv_text(rounds: list[dict[str, Any]]) -> str:
    """The CSV log of `rounds`: a `round` column, then every scalar any round has, in
    first-seen order; a round without a value leaves its cell empty."""
    rows = [round_scalars(record) for record in rounds]
    columns = list(dict.fromkeys(name for row in rows for name in row))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["round", *columns])
    for record, row in zip(rounds, rows):
        cells = [row.get(name) for name in columns]
        writer.writerow([record["round"], *("" if c is None else _number(c) for c in cells)])
    return out.getvalue()


def _number(value: float) -> str:
    return str(int(value)) if math.isfinite(value) and value.is_integer() else repr(value)


def write_csv_log(out_dir: Path, rounds: list[dict[str, Any]]) -> Path:
    """Write history.csv for `rounds` atomically (0600, like history.json); return its path.

    Rewritten whole every round, so columns that appear late (ε, a new metric) get a
    header, and a resumed run's log continues its history."""
    path = out_dir / CSV_FILE
    atomic_write_text(path, csv_text(rounds))
    return path
