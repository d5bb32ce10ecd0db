"""fl-keras: federated learning for Keras models on Flower.

Subpackages are layers (docs/architecture.md): `schema` and `wire` at the bottom, then
`protocol` (what server and client both compute), `data`, `ml` (beside the top-level
`strategies` package, the server's only), `server` and `client`, `app` (the ServerApp and
ClientApp) and `worker`, `cli`, `api`; imports point down only.
"""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) hides the run's own progress.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow and TenSEAL (homomorphic-encryption=ckks) each bundle protobuf; loaded after
# TensorFlow, TenSEAL binds to TensorFlow's copy and cannot serialize ("failed to save
# proto"), so it is loaded first, in every process that imports the app (60 ms).
try:
    import tenseal  # noqa: F401
except ImportError:  # the optional `he` extra is not installed
    pass


def preload_tenseal() -> None:
    """Nothing: importing this package loaded TenSEAL. A Ray `worker_process_setup_hook`, so
    simulated clients load TenSEAL before Flower's Ray actor imports TensorFlow."""
