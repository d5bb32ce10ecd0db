"""Fast local training for compiled Keras models: compiled epoch loops instead of `model.fit`.

`model.fit`/`evaluate` pay ~150-250 ms of fixed cost per call (callbacks, data adapters,
retracing); a small federated client does ~10 ms of real work. `KerasTrainer` builds the
model's train and eval loops once as `tf.function`s and reuses them across rounds and
across the clients that share a process.

What trains is what the user compiled: the loss and regularization losses through the
model's own `compute_loss`, the metrics through `compute_metrics` (reported under their
Keras names, reset on every call), and a fresh copy of the compiled optimizer (class and
hyperparameters; the `optimizer`/`learning-rate` keys replace it only when set). Every
call starts from the weights it is given, and `fit` also from fresh optimizer state; the
layers' random state (Dropout's seed generators, which live outside `model.weights`) is
reseeded on every fit, so no state leaks between clients. `forget` puts the model back to
the weights it was built with (a set_weights, no rebuild): the client calls it after every
fit and evaluate, so no client's or run's weights stay in a trainer that the next one shares.
A custom `train_step` runs only under `model.fit` and is not used here. With a
`Standardization` (`standardize=true`) `fit` trains on standardized inputs and targets and
`evaluate` reports on the target's own scale, as the final model with its Normalization and
Rescaling layers would (`fl_app.ml.standardize`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache, partial

import keras
import numpy as np
import tensorflow as tf

from fl_app.data.files import file_stamp
from fl_app.data.sources import DataSpec, Split
from fl_app.ml.errors import ModelError
from fl_app.ml.models import build_model, wants_one_hot
from fl_app.ml.standardize import UNSCALED, Standardization
from fl_app.schema import LayerSettings

EVAL_CHUNK = 4096
BUDGET_CHECK_SHARE = 0.05  # under a time budget, the clock is read every ~5% of the budget
SEED_STATE = "seed_generator_state"  # name of a keras.random.SeedGenerator's state variable


@dataclass(frozen=True)
class FitResult:
    """What one local training call produced: the last epoch's mean loss and compiled
    metrics (by Keras name; a partial epoch's under a time budget), the wall time and the
    number of local optimizer steps taken (FedNova's tau)."""

    loss: float
    metrics: dict[str, float]
    seconds: float
    steps: int


def fresh_optimizer(model: keras.Model, name: str = "",
                    learning_rate: float = 0.0) -> keras.optimizers.Optimizer:
    """A new, unbuilt optimizer: Keras' `name` (with its default hyperparameters) if given,
    else a copy of the model's compiled one; with `learning_rate` > 0 at that rate."""
    if name:
        config = keras.optimizers.get(name).get_config()
        cls = type(keras.optimizers.get(name))
    else:
        config, cls = model.optimizer.get_config(), type(model.optimizer)
    if learning_rate:  # also replaces a compiled LearningRateSchedule
        config = {**config, "learning_rate": learning_rate}
    return cls.from_config(config)


def _scalar_metrics(results: Mapping[str, tf.Tensor | np.ndarray | float]) -> dict[str, float]:
    """Keras metric results as floats, leaving out the loss tracker and non-scalar results
    (e.g. per-class F1 vectors), which Flower metrics cannot carry."""
    return {name: float(value) for name, value in results.items()
            if name != "loss" and np.ndim(value) == 0}


def _stretch(slowdown: float, started: float) -> None:
    """Sleep (slowdown - 1) times the seconds since `started`: what `started`'s work would
    have taken on a device `slowdown` times slower."""
    if slowdown > 1.0:
        time.sleep((slowdown - 1.0) * (time.perf_counter() - started))


def _stretched(slowdown: float, train: Callable[..., tf.Tensor], *args: object) -> float:
    """`train(*args)`'s loss sum as a float, stretched by `slowdown` (`_stretch`)."""
    started = time.perf_counter()
    loss_sum = float(train(*args))
    _stretch(slowdown, started)
    return loss_sum


class KerasTrainer:
    """Compiled train/evaluate loops for one compiled Keras model, reusable across clients.

    `fit` optionally adds FedProx's proximal term mu/2 * ||w - w_global||^2 to the loss it
    differentiates (not to the loss it reports). Targets are encoded as the loss expects
    them: one-hot for categorical cross-entropy, integers for sparse losses, float columns
    otherwise.
    """

    def __init__(self, model: keras.Model, spec: DataSpec,
                 optimizer: keras.optimizers.Optimizer | None = None) -> None:
        self.model = model
        self.spec = spec
        self.optimizer = optimizer if optimizer is not None else fresh_optimizer(model)
        self._one_hot = wants_one_hot(model)
        self._units = int(model(np.zeros((1, *spec.input_shape), np.float32)).shape[-1])
        self._on_schedule = isinstance(self.optimizer.get_config().get("learning_rate"), dict)
        self.optimizer.build(model.trainable_variables)
        self._initial = model.get_weights()  # built or loaded: no client's data in them
        self._optimizer_initial = [v.numpy() for v in self.optimizer.variables]
        self._seed_states = [v for v in model.variables if v.name == SEED_STATE]
        self._anchor = [tf.Variable(v, trainable=False) for v in model.trainable_variables]
        self._mu = tf.Variable(0.0, trainable=False, dtype=tf.float32)
        self._kept: list[tuple[keras.Variable, tf.Variable]] | None = None  # pruning masks
        self._build_loss_and_metrics()
        self._train_epoch = tf.function(self._train_epoch_impl, reduce_retracing=True)
        self._train_epoch_pruned = tf.function(partial(self._train_epoch_impl, pruned=True),
                                               reduce_retracing=True)
        self._eval_chunk = tf.function(self._eval_chunk_impl, reduce_retracing=True)

    def _build_loss_and_metrics(self) -> None:
        """Run the compiled loss and metrics once eagerly on two blank examples, so their
        variables exist before tracing, and so a loss that cannot take the dataset's
        targets fails here, before any training, with the model named."""
        x = np.zeros((2, *self.spec.input_shape), np.float32)
        y_shape = (2, self.spec.num_classes) if self.spec.task == "multilabel" else (2,)
        y = self.targets(np.zeros(y_shape, np.float32 if self.spec.task == "regression"
                                  else np.int32))
        try:
            y_pred = self.model(x, training=False)
            self.model.compute_loss(x=x, y=y, y_pred=y_pred, training=False)
            self.model.compute_metrics(x, y, y_pred, None)
        except Exception as err:  # Keras raises many kinds for mismatched shapes
            raise ModelError(f"model {self.model.name!r}: its compiled loss or metrics cannot "
                             f"take the targets of {self.spec.describe()}: "
                             f"{type(err).__name__}: {err}") from err
        self.model.reset_metrics()

    def targets(self, y: np.ndarray) -> np.ndarray:
        """`y` as the compiled loss takes it."""
        if self._one_hot:
            return np.eye(self._units, dtype=np.float32)[y.astype(np.int64)]
        if self.spec.task == "multiclass" or (self.spec.task == "binary" and self._units == 2):
            return y.astype(np.int32)
        y = y.astype(np.float32)
        return y.reshape(len(y), -1) if y.ndim == 1 else y

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

    def reset_optimizer(self, learning_rate: float | None = None) -> None:
        """Return the optimizer to its freshly built state (optionally at a new rate; an
        optimizer on a LearningRateSchedule keeps its schedule)."""
        for var, initial in zip(self.optimizer.variables, self._optimizer_initial):
            var.assign(initial)
        if learning_rate and not self._on_schedule:
            self.optimizer.learning_rate = learning_rate

    def forget(self) -> None:
        """Return the model to the weights it was built with, the optimizer to its fresh
        state, FedProx's anchor to zeros and the metrics to empty: nothing of the last call
        (a client's trained weights, a decrypted global model) stays readable."""
        self.model.set_weights(self._initial)
        self.reset_optimizer()
        for anchor in self._anchor:
            anchor.assign(tf.zeros_like(anchor))
        self.model.reset_metrics()

    def reseed_layers(self, rng: np.random.Generator) -> None:
        """Restart every layer's random stream (Dropout masks, noise) from `rng`.

        Keras keeps these seed generators' states outside `model.weights`, so loading
        weights does not reset them.
        """
        for state in self._seed_states:
            seed = rng.integers(np.iinfo(np.int32).max)
            state.assign(np.array([seed, 0], dtype=state.dtype))

    def _load_mask(self, pruned: list[np.ndarray]) -> None:
        """Keep the entries `pruned` marks (one boolean array per weight array, True:
        pruned) at zero in the next fit: a 0/1 keep-mask per trainable kernel (a variable
        of two or more axes), made on first use."""
        if self._kept is None:
            self._kept = [(var, tf.Variable(tf.ones(var.shape, var.dtype), trainable=False))
                          for var in self.model.trainable_variables if len(var.shape) >= 2]
        index = {id(var): i for i, var in enumerate(self.model.weights)}
        for var, keep in self._kept:
            keep.assign(np.logical_not(pruned[index[id(var)]]).astype(keep.dtype.as_numpy_dtype))

    def _zero_pruned(self) -> None:
        """Set the pruned entries of the trainable kernels back to zero."""
        for var, keep in self._kept or ():
            var.assign(var * keep)

    # ---- compiled loops
    def _train_epoch_impl(self, x: tf.Tensor, y: tf.Tensor, order: tf.Tensor,
                          batch_size: tf.Tensor, weights: tf.Tensor | None = None,
                          pruned: bool = False) -> tf.Tensor:
        n = tf.shape(order)[0]
        num_batches = (n + batch_size - 1) // batch_size
        loss_sum = tf.constant(0.0)
        variables = self.model.trainable_variables
        for b in tf.range(num_batches):
            idx = order[b * batch_size:tf.minimum((b + 1) * batch_size, n)]
            xb, yb = tf.gather(x, idx), tf.gather(y, idx)
            wb = None if weights is None else tf.gather(weights, idx)
            with tf.GradientTape() as tape:
                out = self.model(xb, training=True)
                loss = tf.cast(self.model.compute_loss(x=xb, y=yb, y_pred=out, sample_weight=wb,
                                                       training=True), tf.float32)
                prox = tf.add_n([tf.reduce_sum(tf.square(tf.cast(w - a, tf.float32)))
                                 for w, a in zip(variables, self._anchor)])
                objective = loss + 0.5 * self._mu * prox
                scaled = self.optimizer.scale_loss(objective)  # mixed precision's loss scale
            grads = tape.gradient(scaled, variables)
            self.optimizer.apply_gradients(zip(grads, variables))
            if pruned:  # after every step, so the user's optimizer trains the rest
                self._zero_pruned()
            loss_sum += loss * tf.cast(tf.shape(idx)[0], tf.float32)
            self.model.compute_metrics(xb, yb, out, wb)
        return loss_sum

    def _eval_chunk_impl(self, x: tf.Tensor, y: tf.Tensor, scale: tf.Tensor,
                         offset: tf.Tensor) -> tf.Tensor:
        out = self.model(x, training=False)
        out = out * tf.cast(scale, out.dtype) + tf.cast(offset, out.dtype)  # exact for 1 and 0
        return self._score(x, y, out) * tf.cast(tf.shape(x)[0], tf.float32)

    def _score(self, x: tf.Tensor | None, y: tf.Tensor, out: tf.Tensor) -> tf.Tensor:
        """The compiled loss (float32) of predictions `out` for targets `y`, the compiled
        metrics updated with them."""
        loss = tf.cast(self.model.compute_loss(x=x, y=y, y_pred=out, training=False), tf.float32)
        self.model.compute_metrics(x, y, out, None)
        return loss

    def base_learning_rate(self) -> float | None:
        """The rate the optimizer starts every call at (the compiled or configured one),
        None when it follows a LearningRateSchedule."""
        return None if self._on_schedule else float(self.optimizer.learning_rate)

    # ---- public calls
    def fit(self, data: Split, *, epochs: int | None, batch_size: int,
            learning_rate: float | None = None, proximal_mu: float = 0.0,
            seed: int | list[int] = 0, time_budget: float | None = None,
            steps: int | None = None, slowdown: float = 1.0,
            standardization: Standardization | None = None,
            sample_weight: np.ndarray | None = None,
            pruned: list[np.ndarray] | None = None) -> FitResult:
        """Train on `data` from the current weights; optimizer and layer RNGs start fresh.

        `learning_rate` (if given) replaces the optimizer's rate; `seed` fixes the
        shuffling and the layers' random streams. With `time_budget` (seconds, counted
        from the call) training stops once the budget has run out, checked between chunks
        of steps (at least one step runs; `epochs` then caps it, None for no cap). With
        `steps` (no time budget) it stops after that many optimizer steps, the last epoch
        cut short (`epochs` caps it, None for no cap). `slowdown` > 1 simulates a device
        that many times slower: after each compiled chunk of steps it sleeps (slowdown - 1)
        times the chunk's duration, so time budgets and measurements see it. With
        `standardization` it trains on standardized inputs and targets (its loss and
        metrics are then on the standardized scale). `sample_weight` (one per example)
        weighs the compiled loss and metrics as `model.fit`'s does (`class_weight` becomes
        exactly such weights there). With `pruned` (a boolean array per weight array, True:
        pruned; `strategies.pruning`) the pruned entries of the trainable kernels are set
        back to zero after every optimizer step, inside the compiled loop, and after the
        optimizer's final values.
        """
        if epochs is None and not time_budget and not steps:
            raise ValueError("fit needs a number of epochs, of steps or a time budget")
        if steps and time_budget:
            raise ValueError("fit takes a number of steps or a time budget, not both")
        start = time.perf_counter()
        self.reset_optimizer(learning_rate)
        for anchor, var in zip(self._anchor, self.model.trainable_variables):
            anchor.assign(var)
        self._mu.assign(proximal_mu)
        if standardization is not None:
            data = Split(standardization.inputs(data.x), standardization.targets(data.y))
        x, y = tf.constant(data.x), tf.constant(self.targets(data.y))
        w = None if sample_weight is None else tf.constant(sample_weight, tf.float32)
        rng = np.random.default_rng(seed)
        self.reseed_layers(rng.spawn(1)[0])  # spawning leaves `rng`'s own stream untouched
        deadline = start + time_budget if time_budget else None
        train_epoch = partial(_stretched, slowdown, self._train_epoch)
        if pruned is not None:
            self._load_mask(pruned)
            train_epoch = partial(_stretched, slowdown, self._train_epoch_pruned)
        cap = steps
        loss_sum, seen, steps, epoch = 0.0, len(data), 0, 0
        while epochs is None or epoch < epochs:
            if epochs is None or deadline is not None or epoch == epochs - 1:
                self.model.reset_metrics()  # report the last (or partial) epoch's metrics
            order = rng.permutation(len(data)).astype(np.int32)
            if deadline is None:
                if cap:
                    order = order[:(cap - steps) * batch_size]
                loss_sum = train_epoch(x, y, tf.constant(order), tf.constant(batch_size), w)
                seen = len(order)
                steps += -(-len(order) // batch_size)
                if steps == cap or not len(order):
                    break
            else:
                loss_sum, seen, steps = self._budgeted_epoch(train_epoch, x, y, w, order,
                                                             batch_size, start, deadline,
                                                             steps)
                if seen < len(data) or time.perf_counter() >= deadline:
                    break
            epoch += 1
        self.optimizer.finalize_variable_values(self.model.trainable_variables)  # EMA, as fit
        if pruned is not None:  # an EMA of the unmasked steps is not pruned
            self._zero_pruned()
        return FitResult(loss_sum / max(seen, 1),
                         _scalar_metrics(self.model.get_metrics_result()),
                         time.perf_counter() - start, steps)

    def _budgeted_epoch(self, train_epoch: Callable[..., float], x: tf.Tensor,
                        y: tf.Tensor, w: tf.Tensor | None, order: np.ndarray, batch_size: int,
                        start: float, deadline: float, steps: int) -> tuple[float, int, int]:
        """One epoch of `train_epoch` in chunks of steps until it ends or `deadline`
        passes; returns its loss sum, the examples it saw and the run's step count so far.
        A chunk is sized, from the time per step measured so far, to take about
        BUDGET_CHECK_SHARE of the budget (one step while nothing has been measured)."""
        loss_sum, seen = 0.0, 0
        while seen < len(order):
            now = time.perf_counter()
            if steps and now >= deadline:
                break
            per_step = (now - start) / steps if steps else 0.0
            share = BUDGET_CHECK_SHARE * (deadline - start)
            chunk = max(1, int(share / per_step)) if per_step > 0 else 1
            idx = order[seen:seen + chunk * batch_size]
            loss_sum += train_epoch(x, y, tf.constant(idx), tf.constant(batch_size), w)
            seen += len(idx)
            steps += -(-len(idx) // batch_size)
        return loss_sum, seen, steps

    def evaluate(self, data: Split, standardization: Standardization | None = None,
                 slowdown: float = 1.0) -> tuple[float, dict[str, float]]:
        """Mean loss and the compiled metrics (by Keras name) of the current weights on
        `data`, in inference mode (no layer draws random numbers, so none is reseeded).
        With `standardization` the inputs are standardized and the outputs scaled back to
        the target's scale before the loss and metrics (`data` as the final model takes it).
        `slowdown` > 1 sleeps (slowdown - 1) times the evaluation's duration after it."""
        started = time.perf_counter()
        self.model.reset_metrics()
        targets = self.targets(data.y)
        x = data.x if standardization is None else standardization.inputs(data.x)
        scale, offset = standardization.output_scale() if standardization else UNSCALED
        loss_sum = 0.0
        for lo in range(0, len(data), EVAL_CHUNK):
            loss_sum += float(self._eval_chunk(tf.constant(x[lo:lo + EVAL_CHUNK]),
                                               tf.constant(targets[lo:lo + EVAL_CHUNK]),
                                               tf.constant(scale), tf.constant(offset)))
        _stretch(slowdown, started)
        return loss_sum / len(data), _scalar_metrics(self.model.get_metrics_result())

    def evaluate_predictions(self, data: Split,
                             y_pred: np.ndarray) -> tuple[float, dict[str, float]]:
        """`evaluate`'s loss and compiled metrics for predictions made elsewhere (another
        copy of the model: an int8 one, a LiteRT file) on `data`."""
        self.model.reset_metrics()
        loss = self._score(None, tf.constant(self.targets(data.y)),
                           tf.constant(y_pred, dtype=tf.float32))
        return float(loss), _scalar_metrics(self.model.get_metrics_result())

    def class_recall(self, data: Split,
                     model: keras.Model | None = None) -> dict[str, float]:
        """Recall of the current weights (or of `model`, e.g. the final model with its
        standardization layers, on raw `data`) on each class present in `data`
        (single-label classes), keyed by class index: the share of its examples predicted
        as it, the prediction being the largest output (one sigmoid unit: above 0.5, as
        Keras' accuracy); scikit-learn's `recall_score(average=None)`."""
        model = self.model if model is None else model
        out = model.predict(data.x, batch_size=EVAL_CHUNK, verbose=0)
        predicted = (out[:, 0] > 0.5).astype(np.int64) if out.shape[-1] == 1 else out.argmax(-1)
        return {str(c): float(np.mean(predicted[data.y == c] == c)) for c in np.unique(data.y)}

    def metric_names(self) -> list[str]:
        """The names under which `fit` and `evaluate` report the compiled metrics."""
        return sorted(_scalar_metrics(self.model.get_metrics_result()))

    def metric_directions(self) -> dict[str, str]:
        """Whether each compiled metric improves going "up" or "down" (Keras' own marks)."""
        directions = {}
        for tracked in self.model.metrics:
            for metric in getattr(tracked, "metrics", [tracked]):
                direction = getattr(metric, "_direction", None)
                if direction in ("up", "down"):
                    directions[metric.name] = direction
        return directions


@lru_cache(maxsize=4)
def cached_trainer(model_name: str, spec: DataSpec, optimizer: str, learning_rate: float,
                   seed: int, stamp: tuple[int, int, int] | None = None,
                   run_id: int = 0) -> KerasTrainer:
    """One trainer per process, run and model: built once, reused by every client call of
    that run (`stamp`, a `.keras` file's version, makes a file rewritten on disk load
    again; `run_id`, Flower's, keeps two runs with equal configs apart)."""
    model = build_model(model_name, spec, seed)
    return KerasTrainer(model, spec, fresh_optimizer(model, optimizer, learning_rate))


@dataclass(frozen=True)
class TrainSettings(LayerSettings):
    """The run-config keys a trainer is built from (`fl_app.ml.settings`: `model`,
    `optimizer`, `learning-rate`; the run's `seed`): built once by the app layer
    (`TrainSettings.from_config(cfg)`)."""

    model: str
    optimizer: str
    learning_rate: float
    seed: int


def trainer_for(settings: TrainSettings, spec: DataSpec, run_id: int = 0) -> KerasTrainer:
    """The process-wide trainer for run `run_id` (Flower's run id; 0 outside a Flower
    run) with these settings' model, optimizer and rate."""
    return cached_trainer(settings.model, spec, settings.optimizer, settings.learning_rate,
                          settings.seed, file_stamp(settings.model), run_id)
