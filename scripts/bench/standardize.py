"""Federated standardization (`standardize=true`) on issue 22's seed case.

    python -m scripts.bench.standardize [--rounds 20] [--seed 42] [--num-supernodes 10]

scikit-learn's diabetes, saved as a new user would (`load_diabetes(as_frame=True)` to a CSV:
ten features and the raw `target`, 25..346), trained with the seed's model
(`examples.keras_models:regression`: Dense(10, relu), Dense(1), Adam(0.01), mse) and
`task='regression'`, through the same entry point as `run_simulation.py`:
(a) raw: the features and target as the file holds them;
(b) standardized: `standardize=true` (the clients' sums pooled into a Normalization layer in
    front of the model and a Rescaling of its output to the target's scale);
(c) central: the same model (same seed) trained with `model.fit` on the pooled training
    splits of all clients, standardized with their central mean and variance, for
    rounds x local-epochs epochs, then wrapped the same way;
(d) for scale: always predicting the training mean.
Every MSE is on the raw target's scale, on the run's held-out test set; (b)'s is also
checked against its `final_model.keras` evaluated on the raw test data.
"""

from __future__ import annotations

import fl_app  # noqa: F401  (quiet TensorFlow start-up: before tensorflow)

# isort: split

import sys
import tempfile
from pathlib import Path

import keras
from sklearn.datasets import load_diabetes

from fl_app.cli import simulate
from fl_app.data.sources import Split, data_source
from fl_app.data.types import DataSettings
from fl_app.ml.models import build_model
from fl_app.ml.standardize import from_moments, moments
from fl_app.schema import RunConfig
from fl_app.server.outputs import MODEL_FILE
from scripts.bench.common import timed_run
from scripts.bench.regression import (
    MODEL,
    mean_baseline,
    parse_args,
    pooled_training_data,
)
from scripts.bench.results_page import recorded

ROOT = Path(__file__).resolve().parents[2]


def write_diabetes_csv(folder: Path) -> str:
    """The seed case's file: diabetes as a data frame (features and raw `target`) in a CSV."""
    path = folder / "diabetes.csv"
    load_diabetes(as_frame=True).frame.to_csv(path, index=False)
    return str(path)


def run_config_overrides(path: str, rounds: int, seed: int, standardize: bool) -> str:
    """The `--run-config` string of one federated run (as run_simulation.py takes it)."""
    return (f"dataset='{path}' label-column='target' task='regression' model='{MODEL}' "
            f"num-server-rounds={rounds} seed={seed} standardize={str(standardize).lower()}")


def central_standardized(cfg: RunConfig, pooled: Split, test: Split, epochs: int) -> float:
    """(c): the seed model fit centrally on the standardized pooled data, wrapped with the
    same Normalization and Rescaling layers; its test MSE on the raw scale."""
    standardization = from_moments(moments(pooled.x, pooled.y))
    spec = data_source(DataSettings.from_config(cfg)).spec
    model = build_model(str(cfg["model"]), spec, int(cfg["seed"]))
    keras.utils.set_random_seed(int(cfg["seed"]))  # the shuffling
    model.fit(standardization.inputs(pooled.x), standardization.targets(pooled.y),
              epochs=epochs, batch_size=int(cfg["batch-size"]), shuffle=True, verbose=0)
    wrapped = standardization.wrap(model, spec.input_shape)
    return float(wrapped.evaluate(test.x, test.y, verbose=0, return_dict=True)["loss"])


def main(argv: list[str] | None = None) -> int:
    """Run (a) to (d), print the table of final test MSEs and write it into
    docs/results.md (unless `--no-results`: print only)."""
    args = parse_args(argv, __doc__)
    folder = Path(tempfile.mkdtemp(prefix="standardize-table-"))
    path = write_diabetes_csv(folder)
    mse = {}
    for standardize in (False, True):
        overrides = run_config_overrides(path, args.rounds, args.seed, standardize)
        history, _ = timed_run(overrides, args.num_supernodes, folder / f"std-{standardize}")
        mse[standardize] = float(history["rounds"][-1]["centralized"]["loss"])
    cfg = simulate.load_run_config(run_config_overrides(path, args.rounds, args.seed, True))
    test = data_source(DataSettings.from_config(cfg)).test_set()
    saved = keras.models.load_model(folder / "std-True" / MODEL_FILE)
    saved_mse = float(saved.evaluate(test.x, test.y, verbose=0, return_dict=True)["loss"])
    pooled = pooled_training_data(cfg, args.num_supernodes)
    central = central_standardized(cfg, pooled, test, args.rounds * int(cfg["local-epochs"]))
    mean = mean_baseline(pooled, test)["mse"]
    with recorded("standardize", "scripts.bench.standardize", write=not args.no_results):
        print(f"diabetes CSV (raw target 25..346), {MODEL} (adam, mse), task='regression', "
              f"{args.num_supernodes} IID clients, {args.rounds} rounds x {cfg['local-epochs']} "
              f"local epochs, seed {args.seed}; final test MSE on the raw scale\n")
        print("| run | final test MSE | / predicting the mean |")
        print("|---|---:|---:|")
        for name, value in (("(a) federated, raw", mse[False]),
                            ("(b) federated, `standardize=true`", mse[True]),
                            ("(c) central `model.fit` on standardized data", central),
                            ("(d) predicting the training mean", mean)):
            print(f"| {name} | {value:,.0f} | {value / mean:.2f} |")
    print(f"\n(b)'s final_model.keras on the raw test set: MSE {saved_mse:,.1f} "
          f"(history: {mse[True]:,.1f}); outputs in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
