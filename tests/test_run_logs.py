"""The run's logs in the formats people use, without a simulation: the CSV log, TensorBoard
event files (read back with TensorBoard's own reader), the console progress (plain lines and
the live bar), history.json's summary and the plots."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fl_app.server.outputs import CURVES, plot_figure
from fl_app.server.progress import ConsoleProgress, client_counts, progress_line
from fl_app.server.round_log import csv_text, round_scalars, write_csv_log
from fl_app.server.run_summary import metric_summary
from fl_app.server.tensorboard import TensorBoardLogger

ROOT = Path(__file__).resolve().parent.parent


def _record(server_round: int, accuracy: float, **extra) -> dict:
    return {"round": server_round,
            "fit": {"num_rejected": 1, "train_loss": 1.0 / server_round, "num_sampled": 4,
                    "num_clients": 3, "num_failures": 1, "data_quality": {"7": {"rows": 9}},
                    "failures": [{"client": "7", "error": "boom"}]},
            "centralized": {"accuracy": accuracy, "loss": 2.0 - accuracy},
            "distributed": {"accuracy": accuracy - 0.1, "loss": 2.1 - accuracy},
            "seconds": 0.5 * server_round, **extra}


ROUNDS = [{"round": 0, "seconds": 0.0, "centralized": {"accuracy": 0.1, "loss": 2.3}},
          _record(1, 0.6), _record(2, 0.8, privacy={"epsilon": 1.5, "delta": 1e-5}),
          _record(3, 0.7, privacy={"epsilon": 2.0, "delta": 1e-5},
                  bytes={"up": 1200, "down": 3400})]


def test_scalars_are_every_numeric_leaf_so_new_sections_need_no_code():
    scalars = round_scalars(ROUNDS[3])
    assert scalars["centralized/accuracy"] == 0.7 and scalars["fit/num_sampled"] == 4
    assert scalars["privacy/epsilon"] == 2.0 and scalars["seconds"] == 1.5
    assert scalars["bytes/up"] == 1200 and scalars["bytes/down"] == 3400  # a later helper's
    assert "round" not in scalars
    assert not [t for t in scalars if "data_quality" in t or t.startswith("fit/failures")]


def test_csv_log_has_one_row_per_round_and_every_column_any_round_has(tmp_path):
    path = write_csv_log(tmp_path, ROUNDS)
    assert path.stat().st_mode & 0o777 == 0o600
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert [row["round"] for row in rows] == ["0", "1", "2", "3"]
    assert rows[0]["fit/num_sampled"] == "" and rows[1]["fit/num_sampled"] == "4"
    assert rows[1]["privacy/epsilon"] == "" and float(rows[3]["privacy/epsilon"]) == 2.0
    assert float(rows[3]["bytes/up"]) == 1200  # columns appearing late get a header
    assert csv_text(ROUNDS).splitlines()[0].startswith("round,seconds,centralized/accuracy")


def test_tensorboard_event_files_read_back_with_tensorboards_reader(tmp_path):
    log_dir = tmp_path / "tensorboard"
    writer = TensorBoardLogger(log_dir)
    for record in ROUNDS:
        writer.on_round_end(record["round"], record)
    writer.on_run_end({})
    events = EventAccumulator(str(log_dir))
    events.Reload()
    tags = set(events.Tags()["tensors"]) | set(events.Tags()["scalars"])
    expected = {"centralized/accuracy", "distributed/loss", "fit/num_sampled",
                "fit/num_failures", "fit/num_rejected", "fit/num_clients", "fit/train_loss",
                "privacy/epsilon", "bytes/up", "bytes/down", "seconds"}
    assert expected <= tags, tags

    def series(tag: str) -> tuple[list[int], list[float]]:
        import tensorflow as tf

        points = events.Tensors(tag)
        return [e.step for e in points], [float(tf.make_ndarray(e.tensor_proto)) for e in points]

    steps, values = series("centralized/accuracy")
    assert steps == [0, 1, 2, 3] and values == pytest.approx([0.1, 0.6, 0.8, 0.7])
    assert series("privacy/epsilon") == ([2, 3], [1.5, 2.0])
    assert series("bytes/up") == ([3], [1200.0])
    assert [p.stat().st_mode & 0o777 for p in log_dir.iterdir()] == [0o600]
    assert log_dir.stat().st_mode & 0o777 == 0o700


def test_client_counts_say_sampled_ok_failed_rejected():
    fit = ROUNDS[1]["fit"]  # 4 sampled, 3 replied of which 1 rejected, 1 failed
    assert client_counts(fit) == "4 sampled: 2 ok, 1 failed, 1 rejected"
    line = progress_line(ROUNDS[3], num_rounds=5, eta=12.0)
    assert line == ("round   3/5 | 4 sampled: 2 ok, 1 failed, 1 rejected | accuracy 0.7000  "
                    "loss 1.3000  ε 2.000 | 1.50 s | ETA 0:00:12")


def test_plain_progress_prints_startup_apart_a_line_per_round_and_the_end(capsys):
    progress = ConsoleProgress(num_rounds=3, live=False)
    progress.on_run_begin({}, startup_seconds=12.34)
    for record in ROUNDS:
        progress.on_round_end(record["round"], record)
    progress.on_run_end({"stopped": "num-server-rounds",
                         "summary": {"rounds_run": 3, "total_seconds": 20.0}})
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("started in 12.3 s")
    assert lines[1] == "round   0/3 | accuracy 0.1000  loss 2.3000"
    # ETA: the mean round time so far (0.5 s, 1.0 s) times the rounds left
    assert lines[2].endswith("| 0.50 s | ETA 0:00:01") and lines[3].endswith("ETA 0:00:01")
    assert lines[5] == "stopped: num-server-rounds after 3 round(s), 20.0 s in all"


def test_live_progress_is_one_bar_with_round_metrics_and_time_left():
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    progress = ConsoleProgress(num_rounds=3, live=True, console=console)
    progress.on_run_begin({}, startup_seconds=3.0)
    for record in ROUNDS:
        progress.on_round_end(record["round"], record)
    progress.on_run_end({"stopped": "num-server-rounds", "summary": {"rounds_run": 3}})
    text = out.getvalue()
    assert "started in 3.0 s" in text and "stopped: num-server-rounds" in text
    final = text.rsplit("\r", 1)[-1]
    assert "3/3" in final and "accuracy 0.7000" in final and "ε 2.000" in final
    assert "1.50 s/round" in final and "ETA 0:00:00" in final
    assert "round   1/3 |" not in text  # no plain lines under the bar


def test_summary_gives_final_and_best_of_each_metric_with_its_round():
    summary = metric_summary(ROUNDS, {"accuracy": "up"})
    assert summary["centralized"]["accuracy"] == {"final": 0.7, "final_round": 3, "best": 0.8,
                                                  "best_round": 2, "mode": "max"}
    assert summary["centralized"]["loss"]["best"] == pytest.approx(1.2)
    assert summary["centralized"]["loss"]["mode"] == "min"
    assert summary["distributed"]["accuracy"]["best_round"] == 2
    assert summary["fit"] == {"train_loss": {"final": 1 / 3, "final_round": 3, "best": 1 / 3,
                                             "best_round": 3, "mode": "min"}}


def test_plots_have_integer_rounds_context_and_explained_curves():
    from fl_app.server.outputs import plot_curves

    fig = plot_figure("loss", plot_curves(ROUNDS, "loss", CURVES),
                      "weighted-fedavg · digits · 4 clients/round")
    ax = fig.axes[0]
    ax.set_xlim(0, 3)
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert "weighted-fedavg · digits · 4 clients/round" in ax.get_title()
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["centralized: server's held-out test set",
                      "distributed: clients' validation data",
                      "clients' training: fit metrics averaged over clients"]
    assert list(ax.get_lines()[2].get_xdata()) == [1, 2, 3]  # train_loss, from fit


def test_quiet_console_keeps_warnings_and_drops_flowers_chatter():
    from logging import ERROR, INFO, WARNING

    from flwr.common.logger import console_handler, log

    from fl_app.app.logs import quiet_libraries

    stream = io.StringIO()
    previous = console_handler.setStream(stream)
    try:
        quiet_libraries(False)
        log(INFO, "configure_fit: strategy sampled 3 clients (out of 3)")
        log(WARNING, "DEPRECATED FEATURE: The `run_simulation` function is deprecated")
        log(ERROR, "An exception was raised when processing a message by RayBackend")
        log(WARNING, "round 1: client 7 failed: injected fault")
        quiet = stream.getvalue()
        quiet_libraries(True)
        log(INFO, "configure_fit: strategy sampled 3 clients (out of 3)")
        log(WARNING, "DEPRECATED FEATURE: The `run_simulation` function is deprecated")
    finally:
        console_handler.setStream(previous)
    assert quiet.count("\n") == 1 and "round 1: client 7 failed: injected fault" in quiet
    verbose = stream.getvalue()[len(quiet):]
    assert "configure_fit" in verbose and "DEPRECATED FEATURE" in verbose


def test_a_failed_clients_console_line_is_the_last_line_of_its_error():
    from fl_app.server.client_failures import last_line

    remote = ("ValueError: Message contains an Error (reason: <class 'RayTaskError'>:<'\n"
              "  File \"faults.py\", line 144\n\n"
              "Exception ClientAppException occurred. Message: injected fault: client 0\n")
    assert last_line(remote) == ("Exception ClientAppException occurred. Message: injected "
                                 "fault: client 0")
    assert last_line("ValueError: TTL expired") == "ValueError: TTL expired"


def test_a_later_run_in_the_same_process_counts_its_start_up_from_its_own_call():
    """The first run of a command counts from the process's start; a second run in the same
    process, or any run called from Python (tests, notebooks), from its call."""
    code = ("import time, psutil\n"
            "from fl_app.server.run_clock import run_start\n"
            "first = run_start(); time.sleep(0.3); before = time.time(); second = run_start()\n"
            "called = run_start(command=False)\n"
            "print(first == psutil.Process().create_time(), second >= before > first + 0.3,"
            " called >= second)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.split() == ["True", "True", "True"]


@pytest.mark.parametrize("module", ["fl_app.cli.simulate", "fl_app.app.client_app",
                                    "fl_app.app.config"])
def test_the_entry_modules_import_no_tensorflow(module):
    # TensorFlow's start-up lines are kept off by loading it after `quiet_libraries`: an
    # entry module that imports it at import time brings them back (a client-side import
    # of KerasClient in the config's chain did once)
    code = (f"import sys, {module}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout[:300]
