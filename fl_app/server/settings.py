"""The server layer's run-config keys: how long a run goes and when it stops early, where
its results and checkpoints are written (and in which formats), where a resumed run
continues from, and how much the console shows."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping

from fl_app.schema import ConfigError, Scalar, Setting

MIN_REPLIES = 3  # `standardize`: fewer kept statistics replies would be one or two clients' own

SETTINGS = [
    Setting("num-server-rounds", int, 20,
            "Maximum number of federated rounds (FedBuff: of new model versions).", "run",
            low=1),
    Setting("server-loop", str, "sync",
            "sync: Flower's synchronous rounds; fedbuff: buffered asynchronous aggregation "
            "(clients keep training, a new model every fedbuff-buffer-size updates).", "run",
            choices=("sync", "fedbuff")),
    Setting("fuse-evaluate", bool, False,
            "Distributed evaluation inside the fit message: each client evaluates the model "
            "it receives on its validation split before training and sends the metrics with "
            "its update, so a round is one message per client instead of two. Round r's "
            "distributed record is then the evaluation of round r-1's model by round r's "
            "fit clients; fraction-evaluate=0 still turns it off. Not with "
            "server-loop=fedbuff or a distributed_* monitor.", "run"),
    Setting("standardize", bool, False,
            "Federated standardization: before round 1 the clients send counts, sums and sums "
            "of squares of their features (and of a regression target), the server adds them, "
            "and the model trains behind a Keras Normalization layer of the pooled mean and "
            "variance (a regression target standardized, scaled back by a Rescaling layer); "
            "final_model.keras takes raw inputs. A client whose means or spreads are outliers "
            "against the others' is dropped; fewer than max(min-fit-clients, 3) kept replies "
            "stop the run. Plaintext only: not with "
            "secure-aggregation, homomorphic-encryption, dp-* strategies or fedbuff.", "run"),
    Setting("monitor", str, "auto",
            "Value the stopping rules watch, as Keras' EarlyStopping: a centralized metric by "
            "its Keras name (loss, accuracy, mae, ...), distributed_<name> for the clients' "
            "validation average, or auto (accuracy when the server evaluates it, else loss).",
            "run"),
    Setting("mode", str, "auto",
            "Whether `monitor` improves downwards (min) or upwards (max); auto: min for "
            "loss- and error-like metrics, max for accuracy-like ones.", "run",
            choices=("auto", "min", "max")),
    Setting("patience", int, 0,
            "Stop after this many evaluated rounds without an improvement of `monitor` "
            "(0 disables).", "run", low=0),
    Setting("min-delta", float, 0.0,
            "An improvement of `monitor` must exceed this much to reset `patience`.", "run",
            low=0.0),
    Setting("target", float, 0.0,
            "Stop once `monitor` reaches this value: at or above it in max mode, at or below "
            "it in min mode (0 disables).", "run"),
    Setting("max-idle-rounds", int, 3,
            "Stop after this many rounds in a row in which no client update made it into the "
            "model (every client failed, timed out or was rejected, or the round was skipped; "
            "0 disables).", "run", low=0),
    Setting("round-timeout", float, 0.0,
            "Seconds a round waits for its clients (0 waits forever); clients are started "
            "before round 1, so their start-up does not count.", "run", low=0.0),
    Setting("out-dir", str, "",
            "Folder for history.json, history.csv, final_model.keras, plots (and tensorboard/) "
            "(empty: outputs/<timestamp> under the working directory).", "run"),
    Setting("resume-from", str, "",
            "Output folder of an interrupted run: continue it after its last complete round "
            "(from its checkpoint.npz; empty: start a new run).", "run"),
    Setting("tensorboard", bool, False,
            "Also write TensorBoard event files (per-round scalars) to <out-dir>/tensorboard; "
            "needs the `tensorboard` extra (pip install 'fl-keras[tensorboard]').", "run"),
    Setting("export-int8", bool, False,
            "Also write the final model as int8 copies for devices: final_model.int8.keras "
            "(Keras 3 int8 quantization) and final_model.int8.tflite (LiteRT, int8 weights), "
            "with each file's size, loss and metrics on the server's test set in "
            "history.json (summary.export). Not with homomorphic-encryption: the server has "
            "no plaintext model.", "run"),
    Setting("verbose", bool, False,
            "Show the libraries' own logs (Flower's per-call lines and [SUMMARY], "
            "TensorFlow, Ray workers, deprecation warnings) instead of only the progress.",
            "run"),
]


def _check_standardize(values: Mapping[str, Scalar]) -> None:
    """The statistics round is plaintext and outside any privacy accounting: refused where
    the server must not see one client's sums (secure aggregation, homomorphic encryption)
    or where their release is not covered (DP), and with FedBuff (no rounds)."""
    if not values["standardize"]:
        return
    conflicts = [f"{key}={values[key]!r}" for key in ("secure-aggregation",
                                                       "homomorphic-encryption")
                 if values[key] != "none"]
    if str(values["strategy"]).startswith("dp-"):
        conflicts.append(f"strategy={values['strategy']!r}")
    if values["server-loop"] == "fedbuff":
        conflicts.append("server-loop='fedbuff'")
    if conflicts:
        raise ConfigError(f"run-config key 'standardize' is true with {', '.join(conflicts)}: "
                          "its statistics round sends each client's feature sums to the server "
                          "in plaintext (not inside the secure sum, not covered by the DP "
                          "accounting; FedBuff has no round for it): set standardize=false "
                          "and scale the data before the run")
    if values["resume-from"]:
        raise ConfigError("run-config key 'standardize' is true with resume-from: the pooled "
                          "statistics are not in the checkpoint, and a new statistics round "
                          "over other nodes would put the saved weights under another "
                          "Normalization; resume with standardize=false is not the same run "
                          "either, so start the run again")


def check_config(values: Mapping[str, Scalar]) -> None:
    """`tensorboard` needs the TensorBoard package, found before any training;
    `fuse-evaluate` needs the synchronous loop (FedBuff has no rounds to evaluate in) and a
    centralized `monitor` (fused distributed metrics are a round late); `standardize` needs
    a plaintext synchronous run (`_check_standardize`); `export-int8` needs a plaintext
    final model without standardization layers."""
    _check_standardize(values)
    if values["export-int8"] and values["homomorphic-encryption"] != "none":
        raise ConfigError("run-config key 'export-int8' is true but homomorphic-encryption is "
                          f"{values['homomorphic-encryption']!r}: the server never holds the "
                          "final model in plaintext, so it cannot quantize it; set "
                          "export-int8=false (a key holder can quantize the decrypted "
                          "final_model.keras)")
    if values["export-int8"] and values["standardize"]:
        raise ConfigError("run-config key 'export-int8' is true but standardize is true: the "
                          "int8 copies are not made of the model with its standardization "
                          "layers yet; set one of them to false")
    if values["fuse-evaluate"] and str(values["monitor"]).startswith("distributed_"):
        raise ConfigError(f"run-config key 'fuse-evaluate' is true but monitor is "
                          f"{values['monitor']!r}: a fused round's distributed metrics are the "
                          "previous round's model, so the stopping rules would act a round "
                          "late: monitor a centralized metric or set fuse-evaluate=false")
    if values["fuse-evaluate"] and values["server-loop"] == "fedbuff":
        raise ConfigError("run-config key 'fuse-evaluate' is true but server-loop is "
                          "'fedbuff', which has no fit rounds to evaluate in: set "
                          "fuse-evaluate=false or server-loop='sync'")
    if values["tensorboard"] and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("run-config key 'tensorboard' is true but the tensorboard package "
                          "is not installed: pip install 'fl-keras[tensorboard]' (or set "
                          "tensorboard=false)")
