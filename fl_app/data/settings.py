"""The data layer's run-config keys: which dataset, how it is split across clients."""

from __future__ import annotations

from fl_app.schema import Scalar, Setting


def _dataset_names() -> list[str]:
    from fl_app.data.sources import DATASET_NAMES

    return list(DATASET_NAMES)


def _partitioner_names() -> list[str]:
    from fl_app.data.partitioning import PARTITIONER_NAMES

    return list(PARTITIONER_NAMES)


def _is_hub_dataset(value: Scalar) -> bool:
    """`hf:<hub id>` with a non-empty id."""
    return str(value).startswith("hf:") and bool(str(value).removeprefix("hf:").strip())


SETTINGS = [
    Setting("dataset", str, "digits",
            "Dataset: embedded digits, generated Synthetic(alpha,beta), or a hub dataset "
            "(needs network).", "data", choices=_dataset_names,
            check=_is_hub_dataset, check_hint="'hf:<hub id>'"),
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
    Setting("synthetic-alpha", float, 1.0, "Synthetic(alpha,beta): model heterogeneity.", "data",
            low=0.0),
    Setting("synthetic-beta", float, 1.0, "Synthetic(alpha,beta): data heterogeneity.", "data",
            low=0.0),
    Setting("synthetic-num-users", int, 10,
            "Synthetic(alpha,beta): number of users; each client holds one user's data, so "
            "it must equal the number of clients.", "data", low=1),
    Setting("synthetic-dim", int, 60, "Synthetic(alpha,beta): feature dimension.", "data", low=1),
    Setting("synthetic-classes", int, 10, "Synthetic(alpha,beta): number of classes.", "data",
            low=2),
]
