"""The table a run prints at the end, read back from its history.json."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fl_app.server.outputs import metric_names, read_history


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "" if value is None else format(value, spec)


Column = tuple[str, Callable[[dict[str, Any]], str]]
def _count(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: str(r["fit"][key]) if key in r.get("fit", {}) else ""


def _ok(record: dict[str, Any]) -> str:
    """Clients whose update was accepted: replies (`num_clients`) less rejected ones."""
    fit = record.get("fit", {})
    return str(fit["num_clients"] - fit.get("num_rejected", 0)) if "num_clients" in fit else ""


COUNT_COLUMNS: list[Column] = [
    ("round", lambda r: str(r["round"])),
    ("sampled", _count("num_sampled")),
    ("ok", _ok),
    ("failed", _count("num_failures")),
    ("rejected", _count("num_rejected")),
]
TAIL_COLUMNS: list[Column] = [
    ("bytes up", lambda r: str(r.get("bytes", {}).get("up", ""))),
    ("bytes down", lambda r: str(r.get("bytes", {}).get("down", ""))),
    ("ε", lambda r: _fmt(r.get("privacy", {}).get("epsilon"), ".3f")),
    ("seconds", lambda r: _fmt(r["seconds"], ".2f")),
]


def _metric_column(section: str, name: str, title: str) -> Column:
    return title, lambda r: _fmt(r.get(section, {}).get(name))


def summary_columns(rounds: list[dict[str, Any]]) -> list[Column]:
    """Client counts (sampled = ok + failed + rejected), the centralized metrics by Keras
    name, the distributed ones, the bytes sent up and down, ε and seconds."""
    centralized = [_metric_column("centralized", n, n) for n in metric_names(rounds, "centralized")]
    distributed = [_metric_column("distributed", n, f"dist. {n}")
                   for n in metric_names(rounds, "distributed")]
    return [*COUNT_COLUMNS, *centralized, *distributed, *TAIL_COLUMNS]


def print_summary(out_dir: Path, wall_seconds: float) -> str:
    """Print a table of the run's rounds, read back from history.json, and the total wall
    time; return why the run stopped.

    Columns with no value in any round (ε without DP, ...) are left out."""
    from rich.console import Console
    from rich.table import Table

    history = read_history(out_dir)
    rounds = history["rounds"]
    cells = {name: [cell(r) for r in rounds] for name, cell in summary_columns(rounds)}
    shown = [name for name, column in cells.items() if any(column)]
    table = Table(title=f"Run summary (stopped: {history['stopped']})")
    for name in shown:
        table.add_column(name, justify="right")
    for row in zip(*(cells[name] for name in shown)):
        table.add_row(*row)
    console = Console(width=max(Console().width, 120))
    console.print(table)
    console.print(f"wall time {wall_seconds:.1f} s; history, final model and plots: {out_dir}")
    return str(history["stopped"])
