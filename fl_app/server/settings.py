"""The server layer's run-config keys: how long a run goes, where its results and
checkpoints are written, and where a resumed run continues from."""

from __future__ import annotations

from fl_app.schema import Setting

SETTINGS = [
    Setting("num-server-rounds", int, 20, "Maximum number of federated rounds.", "run", low=1),
    Setting("target-accuracy", float, 0.0,
            "Stop once centralized accuracy reaches this value (0 disables).", "run",
            low=0.0, high=1.0),
    Setting("patience", int, 0,
            "Stop after this many rounds without a better centralized accuracy (0 disables).",
            "run", low=0),
    Setting("max-idle-rounds", int, 3,
            "Stop after this many rounds in a row in which no client update made it into the "
            "model (every client failed, timed out or was rejected, or the round was skipped; "
            "0 disables).", "run", low=0),
    Setting("round-timeout", float, 0.0,
            "Seconds a round waits for its clients (0 waits forever); clients are started "
            "before round 1, so their start-up does not count.", "run", low=0.0),
    Setting("out-dir", str, "",
            "Folder for history.json, final_model.keras and plots "
            "(empty: outputs/<timestamp> under the working directory).", "run"),
    Setting("resume-from", str, "",
            "Output folder of an interrupted run: continue it after its last complete round "
            "(from its checkpoint.npz; empty: start a new run).", "run"),
]
