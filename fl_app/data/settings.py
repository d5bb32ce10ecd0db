"""The data layer's run-config keys: which dataset, how it is split across clients, how a
data file is read and how bad rows are handled."""

from __future__ import annotations

from collections.abc import Mapping

from fl_app.schema import ConfigError, Scalar, Setting


def _dataset_names() -> list[str]:
    from fl_app.data.sources import DATASET_NAMES

    return list(DATASET_NAMES)


def _partitioner_names() -> list[str]:
    from fl_app.data.partitioning import PARTITIONER_NAMES

    return list(PARTITIONER_NAMES)


def _is_hub_dataset_or_file(value: Scalar) -> bool:
    """`hf:<hub id>` with a non-empty id, or a path ending in `.npz`/`.csv`/`.parquet`."""
    from fl_app.data.files import is_data_file

    hub = str(value).startswith("hf:") and bool(str(value).removeprefix("hf:").strip())
    return hub or is_data_file(value)


def _task_choices() -> list[str]:
    from fl_app.data.files import TASK_CHOICES

    return list(TASK_CHOICES)


def _policies() -> list[str]:
    from fl_app.data.quality import POLICIES

    return list(POLICIES)


def _rebalance_modes() -> list[str]:
    from fl_app.data.rebalance import MODES

    return list(MODES)


def check_config(values: Mapping[str, Scalar]) -> None:
    """A named dataset has its own task: `task` must be 'auto' or that task."""
    from fl_app.data.files import AUTO, is_data_file
    from fl_app.data.sources import EMBEDDED_DATASETS

    name, task = values["dataset"], values["task"]
    if task == AUTO or is_data_file(name):
        return
    own = EMBEDDED_DATASETS[name][0].task if name in EMBEDDED_DATASETS else "multiclass"
    if task != own:
        raise ConfigError(f"run-config key 'task' is {task!r}, but dataset {name!r} is {own}: "
                          f"set task='auto' (or {own!r}); task applies to data files")


SETTINGS = [
    Setting("dataset", str, "digits",
            "Dataset: embedded digits, generated Synthetic(alpha,beta) or CIFAR-shaped "
            "synthetic-images, a hub dataset "
            "(needs network), or your own .npz/.csv/.parquet file.", "data",
            choices=_dataset_names, check=_is_hub_dataset_or_file,
            check_hint="'hf:<hub id>' or a path ending in .npz, .csv or .parquet"),
    Setting("label-column", str, "label",
            "Target column of a .csv/.parquet data file (comma-separated for several: "
            "multi-label or multi-value targets); the other columns are features.", "data"),
    Setting("task", str, "auto",
            "Task of a data file; auto follows a user model's compiled loss where it settles "
            "the task (mse, mae, huber: regression), else infers it from the targets. For a "
            "named dataset: auto or its own task.", "data",
            choices=_task_choices),
    Setting("data-cleaning", str, "error",
            "Rows with NaN/Inf features or unusable targets: 'error' stops naming the first "
            "bad row, 'drop-rows' drops them and reports the counts per client.", "data",
            choices=_policies),
    Setting("max-class-imbalance", float, 50.0,
            "Warn when a client's majority class outnumbers its minority class more than "
            "this many times (0: never).", "data", low=0.0),
    Setting("rebalance", str, "none",
            "Rebalance each client's training data by its own class counts: 'class-weight' "
            "(Keras class_weight n/(k*n_c) on the loss), 'oversample' (minority classes "
            "resampled up to the largest), 'augment' (as many new minority examples, by "
            "within-class mixup and feature masking); classification only.", "data",
            choices=_rebalance_modes),
    Setting("partitioner", str, "iid", "flwr-datasets partitioner that splits the training pool.",
            "data", choices=_partitioner_names),
    Setting("dirichlet-alpha", float, 0.3, "Concentration of the Dirichlet partitioner.", "data",
            low=0.0, low_open=True),
    Setting("classes-per-partition", int, 2, "Classes per client for the pathological partitioner.",
            "data", low=1),
    Setting("shards-per-partition", int, 2, "Shards per client for the shard partitioner.", "data",
            low=1),
    Setting("validation-fraction", float, 0.1,
            "Fraction of each client's data kept for its local validation, on which "
            "distributed evaluation runs (0 requires fraction-evaluate=0).", "data",
            low=0.0, high=0.5),
    Setting("test-fraction", float, 0.2,
            "Fraction of the dataset held out on the server for centralized evaluation.", "data",
            low=0.0, high=0.5, low_open=True),
    Setting("synthetic-alpha", float, 1.0,
            "Synthetic(alpha,beta): model heterogeneity, the standard deviation of each user's "
            "model mean (as the FedProx paper's generator).", "data", low=0.0),
    Setting("synthetic-beta", float, 1.0,
            "Synthetic(alpha,beta): data heterogeneity, the standard deviation of each user's "
            "feature mean (as the FedProx paper's generator).", "data", low=0.0),
    Setting("synthetic-iid", bool, False,
            "Synthetic: the paper's Synthetic-IID (one shared model, features N(0, Sigma) on "
            "every user; alpha and beta unused).", "data"),
    Setting("synthetic-max-samples", int, 1000,
            "Synthetic: cap on a user's samples (drawn lognormal(4, 2) + 50; 0: uncapped, as "
            "the paper's data, where one user may hold most samples).", "data", low=0),
    Setting("synthetic-num-users", int, 10,
            "Synthetic(alpha,beta): number of users; each client holds one user's data, so "
            "it must equal the number of clients.", "data", low=1),
    Setting("synthetic-dim", int, 60, "Synthetic(alpha,beta): feature dimension.", "data", low=1),
    Setting("synthetic-classes", int, 10, "Synthetic(alpha,beta): number of classes.", "data",
            low=2),
    Setting("synthetic-images-samples", int, 5000, "synthetic-images: how many 32x32x3 "
            "images are generated, 10 classes balanced, the test set included.", "data",
            low=20),
    Setting("synthetic-images-noise", float, 0.5, "synthetic-images: std of the Gaussian "
            "pixel noise on each image's class pattern (higher is harder; at 0.5, logistic "
            "regression on the pixels gets about 53%).", "data", low=0.0),
]
