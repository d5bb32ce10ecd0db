"""The console of a real run (`run_simulation.py` in a subprocess, standard output not a
terminal, as in CI or a pipe): progress lines and the start-up apart, none of the
libraries' noise unless `--verbose`; and the run's other logs (history.csv, TensorBoard
event files read back with TensorBoard's own reader, history.json's summary, plots)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.slow  # runs Flower simulations

ROOT = Path(__file__).resolve().parents[1]
NOISE = ["configure_fit", "aggregate_fit", "aggregate_evaluate", "[SUMMARY]",
         "Starting Flower ServerApp", "oneDNN", "absl::InitializeLog", "DEPRECATED FEATURE",
         "deduplicates logs", "DeprecationWarning", "FutureWarning", "(pid="]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "run_simulation.py", "--num-supernodes", "3", "--out", str(out),
         "--run-config", "num-server-rounds=2 local-epochs=1 tensorboard=true", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("console") / "run"
    return _run(out), out


def test_console_shows_progress_and_startup_without_library_noise(quiet_run):
    done, _ = quiet_run
    assert done.returncode == 0, done.stdout
    lines = done.stdout.splitlines()
    assert not [line for line in lines if any(noise in line for noise in NOISE)], done.stdout
    assert lines[0].startswith("started in ") and "not counted in round times" in lines[0]
    assert lines[1].startswith("round   0/2 | accuracy ")
    for server_round in (1, 2):
        assert any(line.startswith(f"round   {server_round}/2 | 3 sampled: 3 ok, 0 failed, "
                                   "0 rejected | accuracy ") for line in lines), done.stdout
    assert any(line.startswith("stopped: num-server-rounds after 2 round(s)") for line in lines)
    assert "Run summary" in done.stdout
    assert len(lines) < 25, done.stdout  # progress, summary table, nothing else


def test_verbose_brings_back_the_libraries_logs(tmp_path):
    done = _run(tmp_path / "run", "--verbose")
    assert done.returncode == 0, done.stdout
    assert "configure_fit" in done.stdout and "[SUMMARY]" in done.stdout
    assert "round   2/2 | 3 sampled: 3 ok" in done.stdout


def test_history_has_a_summary_and_unambiguous_client_counts(quiet_run):
    _, out = quiet_run
    history = json.loads((out / "history.json").read_text())
    assert [r["fit"]["num_sampled"] for r in history["rounds"][1:]] == [3, 3]
    summary = history["summary"]
    assert summary["stopped"] == history["stopped"] == "num-server-rounds"
    assert summary["rounds_run"] == 2 and summary["last_round"] == 2
    assert 0 < summary["startup_seconds"] < summary["total_seconds"]
    accuracy = summary["metrics"]["centralized"]["accuracy"]
    values = [r["centralized"]["accuracy"] for r in history["rounds"]]
    assert accuracy["final"] == values[-1] and accuracy["best"] == max(values)
    assert accuracy["best_round"] == values.index(max(values)) and accuracy["mode"] == "max"
    assert {"accuracy", "loss"} <= set(summary["metrics"]["distributed"])
    assert {"train_accuracy", "train_loss"} <= set(summary["metrics"]["fit"])
    assert set(summary["versions"]) == {"flwr", "tensorflow", "keras", "python"}
    assert set(summary["class_recall"]) == {str(c) for c in range(10)}  # digits' classes
    assert summary["worst_class_recall"] == min(summary["class_recall"].values())
    assert all(summary["versions"].values())


def test_csv_log_and_tensorboard_files_hold_every_round(quiet_run):
    _, out = quiet_run
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [row["round"] for row in rows] == ["0", "1", "2"]
    assert [row["fit/num_sampled"] for row in rows] == ["", "3", "3"]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["tensors"])
    assert {"centralized/accuracy", "distributed/loss", "fit/train_loss", "fit/num_sampled",
            "fit/num_failures", "fit/num_rejected", "seconds"} <= tags
    assert [e.step for e in events.Tensors("centralized/accuracy")] == [0, 1, 2]
    assert [e.step for e in events.Tensors("fit/num_clients")] == [1, 2]
    for path in [out / "history.csv", *(out / "tensorboard").iterdir(), out / "accuracy.png"]:
        assert path.stat().st_mode & 0o777 == 0o600, path
