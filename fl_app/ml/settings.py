"""The ml layer's run-config keys: the Keras model and how each client trains it."""

from __future__ import annotations

from fl_app.schema import Setting


def _model_names() -> list[str]:
    from fl_app.ml.models import MODEL_BUILDERS

    return sorted(MODEL_BUILDERS)


SETTINGS = [
    Setting("local-epochs", int, 5, "Local epochs per round (sent in each round's config).",
            "training", low=1),
    Setting("batch-size", int, 16, "Local batch size (sent in each round's config).",
            "training", low=1),
    Setting("learning-rate", float, 0.1, "Local learning rate (sent in each round's config).",
            "training", low=0.0, low_open=True),
    Setting("optimizer", str, "sgd", "Local Keras optimizer.", "training",
            choices=("sgd", "adam")),
    Setting("model", str, "mlp", "Keras model: a builder name or a path to a .keras file.",
            "training", choices=_model_names, check=lambda v: str(v).endswith(".keras"),
            check_hint="a path ending in '.keras'"),
]
