"""Example user models for `model='examples.keras_models:<function>'` (not part of the app)."""
