"""Which task a run on a data file trains: `task='auto'` follows the user's model when its
compiled loss settles the task, else the targets (`fl_app.data.files`).

An integer-valued target (ages, counts, prices) looks like class labels to the targets
alone; a model compiled with `mse` (or any loss of `REGRESSION_LOSSES`) says it is a
regression, and the run follows the model. A classification loss on a target with
non-integer values is a real conflict, refused naming both (binary cross-entropy on
values within 0..1, soft targets, is not). Builder models (`mlp`, ...) are compiled for
the task they are given, so they settle nothing; an explicit `task` is checked against
the loss by `fl_app.ml.models.check_fits`.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from fl_app.data.files import AUTO, file_stamp, infer_spec, read_data_file
from fl_app.data.types import DataError, DataSpec, is_data_file
from fl_app.ml.errors import ModelError
from fl_app.schema import RunConfig


def settle_task(cfg: RunConfig) -> RunConfig:
    """`cfg` with `task='regression'` where `task` is 'auto', the dataset a file and the
    model a user's whose compiled loss is a regression loss; `cfg` itself otherwise.

    A model or file that cannot be read leaves `cfg` as it is (the run's own loading then
    names the fault). Raises ModelError when a classification loss meets a target with
    non-integer values. Imports TensorFlow only for a file's run with `task='auto'`.
    """
    dataset, model = str(cfg["dataset"]), str(cfg["model"])
    if cfg["task"] != AUTO or not is_data_file(dataset):
        return cfg
    from fl_app.ml.models import MODEL_BUILDERS  # imports TensorFlow

    if model in MODEL_BUILDERS:
        return cfg
    task = _model_task(dataset, file_stamp(dataset), str(cfg["label-column"]), model,
                       file_stamp(model), int(cfg["seed"]))
    return cfg if task is None else cfg.replace(task=task)


def _targets(path: str, label_column: str) -> str:
    """How an error names a file's targets."""
    where = "array 'y'" if path.lower().endswith(".npz") else f"label column {label_column!r}"
    return f"the {where} of data file {path}"


@lru_cache(maxsize=8)
def _model_task(path: str, stamp: tuple[int, int, int] | None, label_column: str,
                model_name: str, model_stamp: tuple[int, int, int] | None,
                seed: int) -> str | None:
    """The task the model settles against the targets' own, if it differs (cached per
    version of the data and model files)."""
    from fl_app.ml.models import SOFT_TARGET_LOSSES, loss_name, loss_task, make_model

    try:
        x, y = read_data_file(path, label_column)
    except DataError:
        return None
    columns = 1 if y.ndim == 1 else int(np.prod(y.shape[1:]))
    regression = DataSpec(tuple(int(d) for d in x.shape[1:]), 0, "regression", columns)
    try:
        spec = infer_spec(x, y, AUTO, path)
    except DataError:  # no task the targets tell (e.g. more labels than classes allowed)
        spec = regression
    told = spec.task if spec is not regression else None
    try:  # a function taking the DataSpec gets what it would get without this step
        model = make_model(model_name, spec, seed)
    except ModelError:
        return None
    settled = loss_task(model)
    if settled == "regression":
        return None if told == "regression" else "regression"
    if settled == "classification" and told == "regression":
        finite = y[np.isfinite(y)]
        soft = loss_name(model) in SOFT_TARGET_LOSSES and bool(np.all((finite >= 0) &
                                                                      (finite <= 1)))
        if not soft:
            raise ModelError(f"model {model_name!r} is compiled with {loss_name(model)}, a "
                             f"classification loss, but {_targets(path, label_column)} holds "
                             "non-integer values (a regression target): compile it with a "
                             "regression loss (mse, mae, huber, ...) or give integer class "
                             "labels 0..K-1")
    return None
