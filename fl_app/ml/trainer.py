"""Fast local training for Keras models: compiled epoch loops instead of `model.fit`.

`model.fit`/`evaluate` pay ~150-250 ms of fixed cost per call (callbacks, data adapters,
retracing); a small federated client does ~10 ms of real work. `KerasTrainer` builds
the model's train and eval loops once as `tf.function`s and reuses them across rounds
and across the clients that share a process. Every call starts from the weights it is
given, and `fit` also from a fresh optimizer; the layers' random state (Dropout's seed
generators, which live outside `model.weights`) is reseeded on every fit, so no state
leaks between clients.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import keras
import numpy as np
import tensorflow as tf

from fl_app.data.sources import DataSpec, Split
from fl_app.ml.models import build_model, outputs_probabilities
from fl_app.schema import RunConfig

EVAL_CHUNK = 4096
SEED_STATE = "seed_generator_state"  # name of a keras.random.SeedGenerator's state variable


@dataclass(frozen=True)
class FitResult:
    """What one local training call produced."""

    loss: float
    accuracy: float
    seconds: float


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """The local optimizer by run-config name."""
    optimizers = {"sgd": keras.optimizers.SGD, "adam": keras.optimizers.Adam}
    return optimizers[name](learning_rate=learning_rate)


class KerasTrainer:
    """Compiled train/evaluate loops for one Keras model, reusable across clients.

    The loss is sparse categorical cross-entropy (from logits unless the model ends in a
    softmax). `fit` optionally adds FedProx's proximal term mu/2 * ||w - w_global||^2.
    """

    def __init__(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        self.model = model
        self.optimizer = optimizer
        self._loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=not outputs_probabilities(model), reduction="sum"
        )
        optimizer.build(model.trainable_variables)
        self._optimizer_initial = [v.numpy() for v in optimizer.variables]
        self._seed_states = [v for v in model.variables if v.name == SEED_STATE]
        self._anchor = [tf.Variable(v, trainable=False) for v in model.trainable_variables]
        self._mu = tf.Variable(0.0, trainable=False, dtype=tf.float32)
        self._train_epoch = tf.function(self._train_epoch_impl, reduce_retracing=True)
        self._eval_chunk = tf.function(self._eval_chunk_impl, reduce_retracing=True)

    # ---- weights
    def get_weights(self) -> list[np.ndarray]:
        """All model weights (trainable and not), as Flower parameters."""
        return self.model.get_weights()

    def set_weights(self, weights: list[np.ndarray]) -> None:
        """Load weights; raise ValueError if their number or shapes do not fit the model."""
        expected = self.model.weights
        if len(weights) != len(expected):
            raise ValueError(f"got {len(weights)} weight arrays, the model has {len(expected)}")
        for i, (w, var) in enumerate(zip(weights, expected)):
            if tuple(np.shape(w)) != tuple(var.shape):
                raise ValueError(f"weight array {i} has shape {np.shape(w)}, "
                                 f"the model expects {tuple(var.shape)}")
        self.model.set_weights(weights)

    def reset_optimizer(self, learning_rate: float) -> None:
        """Return the optimizer to its freshly built state with a new learning rate."""
        for var, initial in zip(self.optimizer.variables, self._optimizer_initial):
            var.assign(initial)
        self.optimizer.learning_rate = learning_rate

    def reseed_layers(self, rng: np.random.Generator) -> None:
        """Restart every layer's random stream (Dropout masks, noise) from `rng`.

        Keras keeps these seed generators' states outside `model.weights`, so loading
        weights does not reset them.
        """
        for state in self._seed_states:
            seed = rng.integers(np.iinfo(np.int32).max)
            state.assign(np.array([seed, 0], dtype=state.dtype))

    # ---- compiled loops
    def _train_epoch_impl(self, x: tf.Tensor, y: tf.Tensor, order: tf.Tensor,
                          batch_size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        n = tf.shape(order)[0]
        num_batches = (n + batch_size - 1) // batch_size
        loss_sum = tf.constant(0.0)
        correct = tf.constant(0.0)
        for b in tf.range(num_batches):
            idx = order[b * batch_size:tf.minimum((b + 1) * batch_size, n)]
            xb, yb = tf.gather(x, idx), tf.gather(y, idx)
            with tf.GradientTape() as tape:
                out = self.model(xb, training=True)
                batch_loss = self._loss(yb, out)
                loss = batch_loss / tf.cast(tf.shape(idx)[0], tf.float32)
                prox = tf.add_n([tf.reduce_sum(tf.square(w - a)) for w, a in
                                 zip(self.model.trainable_variables, self._anchor)])
                loss = loss + 0.5 * self._mu * prox
                if self.model.losses:
                    loss = loss + tf.add_n(self.model.losses)
            grads = tape.gradient(loss, self.model.trainable_variables)
            self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
            loss_sum += batch_loss
            correct += tf.reduce_sum(tf.cast(
                tf.equal(tf.argmax(out, axis=-1, output_type=tf.int32), yb), tf.float32))
        return loss_sum, correct

    def _eval_chunk_impl(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        out = self.model(x, training=False)
        correct = tf.reduce_sum(tf.cast(
            tf.equal(tf.argmax(out, axis=-1, output_type=tf.int32), y), tf.float32))
        return self._loss(y, out), correct

    # ---- public calls
    def fit(self, data: Split, *, epochs: int, batch_size: int, learning_rate: float,
            proximal_mu: float = 0.0, seed: int | list[int] = 0) -> FitResult:
        """Train on `data` from the current weights; optimizer and layer RNGs start fresh.

        `seed` fixes the shuffling and the layers' random streams.
        """
        start = time.perf_counter()
        self.reset_optimizer(learning_rate)
        for anchor, var in zip(self._anchor, self.model.trainable_variables):
            anchor.assign(var)
        self._mu.assign(proximal_mu)
        x, y = tf.constant(data.x), tf.constant(data.y)
        rng = np.random.default_rng(seed)
        self.reseed_layers(rng.spawn(1)[0])  # spawning leaves `rng`'s own stream untouched
        loss_sum = correct = 0.0
        for _ in range(epochs):
            order = tf.constant(rng.permutation(len(data)).astype(np.int32))
            epoch_loss, epoch_correct = self._train_epoch(x, y, order, tf.constant(batch_size))
            loss_sum, correct = float(epoch_loss), float(epoch_correct)
        n = len(data)
        return FitResult(loss_sum / n, correct / n, time.perf_counter() - start)

    def evaluate(self, data: Split) -> tuple[float, float]:
        """Mean loss and accuracy of the current weights on `data` (inference mode: no
        layer draws random numbers, so none is reseeded)."""
        loss_sum = correct = 0.0
        for lo in range(0, len(data), EVAL_CHUNK):
            chunk_loss, chunk_correct = self._eval_chunk(
                tf.constant(data.x[lo:lo + EVAL_CHUNK]), tf.constant(data.y[lo:lo + EVAL_CHUNK]))
            loss_sum += float(chunk_loss)
            correct += float(chunk_correct)
        return loss_sum / len(data), correct / len(data)


@lru_cache(maxsize=4)
def cached_trainer(model_name: str, spec: DataSpec, optimizer: str, seed: int) -> KerasTrainer:
    """One trainer per process and model: built once, reused by every client call."""
    model = build_model(model_name, spec, seed)
    return KerasTrainer(model, make_optimizer(optimizer, 0.01))


def trainer_for(cfg: RunConfig, spec: DataSpec) -> KerasTrainer:
    """The process-wide trainer for this run config's model and optimizer."""
    return cached_trainer(cfg["model"], spec, cfg["optimizer"], cfg["seed"])
