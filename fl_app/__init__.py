"""fl-keras: federated learning for Keras models on Flower.

Subpackages are layers (docs/architecture.md): `schema` and `wire` at the bottom, then
`data`, `ml` (beside the top-level `strategies` package), `server` and `client`, `app`
(the ServerApp and ClientApp) and `cli`; imports point down only.
"""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) hides the run's own progress.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
