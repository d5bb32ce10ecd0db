"""The run's console: one progress display per run.

On a terminal it is a `rich` progress bar (round, main metrics, ε under DP, time per round,
time remaining) with warnings printed above it; elsewhere (tests, CI, pipes, `flwr run`'s
log stream) one plain line per round. The start-up (imports, simulation engine, clients)
is reported once, apart from the round times.
"""

from __future__ import annotations

import atexit
import sys
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from fl_app.server.callbacks import Callback
from fl_app.server.outputs import metric_names


def client_counts(fit: Mapping[str, Any]) -> str:
    """"3 sampled: 2 ok, 1 failed, 0 rejected": ok = replied and accepted
    (`num_clients` counts the replies, rejected ones included)."""
    replied, rejected = fit.get("num_clients", 0), fit.get("num_rejected", 0)
    failed = fit.get("num_failures", 0)
    sampled = fit.get("num_sampled", replied + failed)  # histories from before num_sampled
    return f"{sampled} sampled: {replied - rejected} ok, {failed} failed, {rejected} rejected"


def main_metrics(record: Mapping[str, Any]) -> str:
    """The centralized metrics by Keras name (else the distributed ones) and ε under DP."""
    section, label = ("centralized", "") if record.get("centralized") else ("distributed",
                                                                             "dist. ")
    values = record.get(section, {})
    parts = [f"{label}{name} {values[name]:.4f}" for name in metric_names([dict(record)], section)]
    if "epsilon" in record.get("privacy", {}):
        parts.append(f"ε {record['privacy']['epsilon']:.3f}")
    return "  ".join(parts)


def duration(seconds: float) -> str:
    """`seconds` as h:mm:ss."""
    return str(timedelta(seconds=round(seconds)))


def progress_line(record: Mapping[str, Any], num_rounds: int | None = None,
                  eta: float | None = None) -> str:
    """One human-readable line per round."""
    of = f"/{num_rounds}" if num_rounds else ""
    parts = [f"round {record['round']:>3}{of}"]
    if "fit" in record:
        parts.append(client_counts(record["fit"]))
    metrics = main_metrics(record)
    if metrics:
        parts.append(metrics)
    if record["round"]:
        parts.append(f"{record['seconds']:.2f} s")
    if eta is not None:
        parts.append(f"ETA {duration(eta)}")
    return " | ".join(parts)


class ConsoleProgress(Callback):
    """The run's progress on the console: a live `rich` bar when `live` (on `console`,
    default: the terminal), else plain lines on standard output."""

    def __init__(self, num_rounds: int, live: bool, console: Any = None) -> None:
        self.num_rounds = num_rounds
        self.live = live
        if live and console is None:
            from rich.console import Console

            console = Console()
        self.console = console
        self.round_seconds: list[float] = []
        self._progress: Any = None
        self._task: Any = None
        self._flower_stream: Any = None

    def _print(self, line: str) -> None:
        if self.live:
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)
        else:
            print(line, flush=True)

    def eta(self, server_round: int) -> float | None:
        """Seconds left: the mean round time of this run so far times the rounds left."""
        if not self.round_seconds:
            return None
        mean = sum(self.round_seconds) / len(self.round_seconds)
        return mean * max(self.num_rounds - server_round, 0)

    def on_run_begin(self, config: Mapping[str, Any], startup_seconds: float) -> None:
        """Report the start-up; start the live bar."""
        self._print(f"started in {startup_seconds:.1f} s (TensorFlow, Flower/Ray, clients; "
                    "not counted in round times)")
        if self.live:
            self._start_live()

    def _start_live(self) -> None:
        from flwr.common.logger import console_handler
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(
            TextColumn("round"), MofNCompleteColumn(), BarColumn(bar_width=24),
            TextColumn("{task.fields[metrics]}"), TextColumn("{task.fields[timing]}"),
            console=self.console, redirect_stdout=True, redirect_stderr=True)
        self._task = self._progress.add_task("rounds", total=self.num_rounds,
                                             metrics="", timing="")
        self._progress.start()
        # Flower's log handler kept the original stderr: send its warnings through the
        # bar's console, so they print above the bar instead of tearing it.
        self._flower_stream = console_handler.setStream(sys.stderr)
        atexit.register(self._stop_live)

    def _stop_live(self) -> None:
        if self._progress is None:
            return
        from flwr.common.logger import console_handler

        console_handler.setStream(self._flower_stream)
        self._progress.stop()
        self._progress = None
        atexit.unregister(self._stop_live)

    def on_round_end(self, server_round: int, record: dict[str, Any]) -> None:
        """Advance the bar, or print the round's line."""
        if server_round and "fit" in record:
            self.round_seconds.append(float(record["seconds"]))
        eta = self.eta(server_round) if server_round else None
        if self._progress is None:
            self._print(progress_line(record, self.num_rounds, eta))
            return
        timing = (f"{record['seconds']:.2f} s/round, ETA {duration(eta)}"
                  if eta is not None else "")
        self._progress.update(self._task, completed=server_round, metrics=main_metrics(record),
                              timing=timing)

    def on_run_end(self, history: dict[str, Any]) -> None:
        """Stop the bar; say why the run stopped and how long it took."""
        self._stop_live()
        summary = history.get("summary", {})
        self._print(f"stopped: {history['stopped']} after {summary.get('rounds_run', '?')} "
                    f"round(s), {summary.get('total_seconds', 0.0):.1f} s in all")
