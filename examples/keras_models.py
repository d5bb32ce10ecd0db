"""Models as Keras users write them, for `model='examples.keras_models:<function>'`.

Each function returns a *compiled* model: its loss, metrics and optimizer are what every
client trains with. A function may take the dataset's `DataSpec` (input shape, task,
number of classes) to size the model, or take nothing.
"""

from __future__ import annotations

import keras

from fl_app.data.sources import DataSpec


def regression() -> keras.Model:
    """The regression model of TensorFlow's federated-learning tutorials, unchanged:
    two dense layers, Adam(0.01), mean squared error (try it on `dataset='diabetes'`)."""
    model = keras.Sequential([keras.layers.Dense(10, activation="relu"), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse", metrics=["mae"])
    return model


def wide_mlp(spec: DataSpec) -> keras.Model:
    """The default `mlp` with a 640-unit hidden layer, about 10x its parameters (48k on
    digits), compiled the same way (SGD(0.1), sparse categorical cross-entropy)."""
    model = keras.Sequential([keras.Input(spec.input_shape), keras.layers.Flatten(),
                              keras.layers.Dense(640, activation="relu"),
                              keras.layers.Dense(spec.num_classes, activation="softmax")],
                             name="wide_mlp")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def functional_classifier(spec: DataSpec) -> keras.Model:
    """A functional classifier with BatchNormalization and Dropout, trained on logits with
    one-hot categorical cross-entropy and Adam."""
    inputs = keras.Input(spec.input_shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(64)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Activation("relu")(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(spec.num_classes)(x)
    model = keras.Model(inputs, outputs, name="functional_classifier")
    model.compile(optimizer=keras.optimizers.Adam(0.003),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy", keras.metrics.TopKCategoricalAccuracy(k=3, name="top3")])
    return model


@keras.saving.register_keras_serializable(package="examples")
class ResidualMLP(keras.Model):
    """A subclassed model: a dense layer with a residual block."""

    def __init__(self, units: int, outputs: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.units, self.outputs = units, outputs
        self.flatten = keras.layers.Flatten()
        self.hidden = keras.layers.Dense(units, activation="relu")
        self.block = keras.layers.Dense(units, activation="relu")
        self.head = keras.layers.Dense(outputs)

    def call(self, inputs, training=False):
        """Flatten, a hidden layer, a residual block, linear outputs."""
        h = self.hidden(self.flatten(inputs))
        return self.head(h + self.block(h))

    def get_config(self) -> dict:
        """What `from_config` needs to rebuild the model."""
        return {**super().get_config(), "units": self.units, "outputs": self.outputs}


def subclassed_classifier(spec: DataSpec) -> keras.Model:
    """`ResidualMLP` on logits with sparse categorical cross-entropy and SGD with momentum."""
    model = ResidualMLP(32, spec.num_classes, name="residual_mlp")
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def nested_binary(spec: DataSpec) -> keras.Model:
    """A Sequential inside a Sequential, for binary targets, with L2 weight decay in the loss."""
    body = keras.Sequential([keras.layers.Dense(16, activation="relu",
                                                kernel_regularizer=keras.regularizers.L2(1e-3))],
                            name="body")
    model = keras.Sequential([keras.Input(spec.input_shape), body,
                              keras.layers.Dense(1, activation="sigmoid")], name="nested")
    model.compile(optimizer="rmsprop", loss="binary_crossentropy",
                  metrics=["accuracy", keras.metrics.AUC(name="auc")])
    return model
