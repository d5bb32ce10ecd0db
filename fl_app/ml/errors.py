"""The ml layer's error, importable without TensorFlow (the CLI catches it)."""


class ModelError(ValueError):
    """A model cannot be loaded or built, is not compiled, or does not fit the data."""
