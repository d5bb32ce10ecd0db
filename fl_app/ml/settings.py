"""The ml layer's run-config keys: the Keras model and how each client trains it."""

from __future__ import annotations

from fl_app.schema import Scalar, Setting

OPTIMIZERS = ("", "sgd", "adam", "adamw", "rmsprop", "adagrad", "adadelta", "adamax",
              "nadam", "ftrl", "lion")  # Keras' built-in names; "" = the compiled one


def _model_names() -> list[str]:
    from fl_app.ml.models import MODEL_BUILDERS

    return sorted(MODEL_BUILDERS)


MODEL_FILE_SUFFIX = ".keras"


def is_model_file(value: object) -> bool:
    """Whether a `model` value names a `.keras` file (by its suffix, case-sensitive as the
    run-config check is); the node's allow-list (`fl_app.client.node_policy`) asks the same."""
    return str(value).endswith(MODEL_FILE_SUFFIX)


def _is_model_reference(value: Scalar) -> bool:
    """A `.keras` path or a `package.module:function`."""
    from fl_app.ml.models import is_function_reference

    return is_model_file(value) or is_function_reference(str(value))


SETTINGS = [
    Setting("local-epochs", int, 5, "Local epochs per round (sent in each round's config).",
            "training", low=1),
    Setting("batch-size", int, 16, "Local batch size (sent in each round's config).",
            "training", low=1),
    Setting("learning-rate", float, 0.0,
            "Local learning rate, replacing the compiled optimizer's (0: keep the model's own; "
            "sent in each round's config).", "training", low=0.0),
    Setting("optimizer", str, "",
            "Local Keras optimizer by name, with Keras' default hyperparameters, replacing "
            "the compiled one (empty: the model's compiled optimizer).", "training",
            choices=OPTIMIZERS),
    Setting("model", str, "mlp",
            "Keras model: a builder name (compiled with a default for the task), a .keras "
            "file (its compiled loss, metrics and optimizer are used) or "
            "'package.module:function' returning a compiled model (it may take the DataSpec).",
            "training", choices=_model_names, check=_is_model_reference,
            check_hint="a path ending in '.keras' or 'package.module:function'"),
]
