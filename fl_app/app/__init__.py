"""The app layer: the run-config schema assembled from every layer, the ServerApp and the
ClientApp that `pyproject.toml` names."""
