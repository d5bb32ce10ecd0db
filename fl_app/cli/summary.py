"""The table a run prints at the end, read back from its history.json."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fl_app.server.outputs import read_history


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "" if value is None else format(value, spec)


SUMMARY_COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("round", lambda r: str(r["round"])),
    ("clients", lambda r: str(r.get("fit", {}).get("num_clients", ""))),
    ("failed", lambda r: str(r.get("fit", {}).get("num_failures", ""))),
    ("rejected", lambda r: str(r.get("fit", {}).get("num_rejected", ""))),
    ("accuracy", lambda r: _fmt(r.get("centralized", {}).get("accuracy"))),
    ("loss", lambda r: _fmt(r.get("centralized", {}).get("loss"))),
    ("distributed acc.", lambda r: _fmt(r.get("distributed", {}).get("accuracy"))),
    ("ε", lambda r: _fmt(r.get("privacy", {}).get("epsilon"), ".3f")),
    ("seconds", lambda r: _fmt(r["seconds"], ".2f")),
]


def print_summary(out_dir: Path, wall_seconds: float) -> str:
    """Print a table of the run's rounds, read back from history.json, and the total wall
    time; return why the run stopped.

    Columns with no value in any round (ε without DP, ...) are left out."""
    from rich.console import Console
    from rich.table import Table

    history = read_history(out_dir)
    cells = {name: [cell(r) for r in history["rounds"]] for name, cell in SUMMARY_COLUMNS}
    shown = [name for name, column in cells.items() if any(column)]
    table = Table(title=f"Run summary (stopped: {history['stopped']})")
    for name in shown:
        table.add_column(name, justify="right")
    for row in zip(*(cells[name] for name in shown)):
        table.add_row(*row)
    console = Console(width=max(Console().width, 100))
    console.print(table)
    console.print(f"wall time {wall_seconds:.1f} s; history, final model and plots: {out_dir}")
    return str(history["stopped"])
