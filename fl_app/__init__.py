"""fl-keras: federated learning for Keras models on Flower."""

import os

# TensorFlow's C++ start-up chatter (oneDNN, CPU features) hides the run's own progress.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
