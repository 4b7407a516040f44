"""The course's own networks, written with ``imclass.layers`` exactly as in its Keras code.

* ``mlp``: ``Dense(100, relu) -> Dense(50, relu) -> Dense(num_classes, softmax)`` (the course's
  example has ``input_dim=200`` and 5 classes: ``create("mlp", input_dim=200, num_classes=5)``);
  without ``input_dim`` it flattens ``(in_chans, img_size, img_size)`` images first.
* ``keras_cnn``: the Keras ``cifar10_cnn`` example. The course issue uses ``Dense(256)``
  (658,218 parameters); ``dense_units=512`` is the Keras example file (1,250,858 parameters).
"""
from __future__ import annotations

from typing import Any, Sequence

from imclass.models._registry import register_model
from imclass.models.sequential import Sequential
from imclass.nn.conv import Conv2D, MaxPooling2D
from imclass.nn.core import Dense, Dropout, Flatten


@register_model
def mlp(num_classes: int = 10, in_chans: int = 3, img_size: int = 32, input_dim: int | None = None,
        hidden: Sequence[int] = (100, 50), activation: Any = "relu", dropout: float = 0.0) -> Sequential:
    """Multi-layer perceptron: Dense layers of sizes ``hidden`` then a softmax classifier."""
    input_shape = (input_dim,) if input_dim is not None else (in_chans, img_size, img_size)
    model = Sequential(input_shape=input_shape)
    if input_dim is None:
        model.add(Flatten())
    for units in hidden:
        model.add(Dense(units, activation=activation))
        if dropout:
            model.add(Dropout(dropout))
    model.add(Dense(num_classes, activation="softmax"))
    return model


@register_model
def keras_cnn(num_classes: int = 10, in_chans: int = 3, img_size: int = 32, dense_units: int = 256) -> Sequential:
    """The Keras CIFAR-10 CNN: two conv pairs (32, 64) with max pooling and dropout, then Dense."""
    return Sequential([
        Conv2D(32, 3, padding="same", activation="relu"),
        Conv2D(32, 3, activation="relu"),
        MaxPooling2D(2),
        Dropout(0.25),
        Conv2D(64, 3, padding="same", activation="relu"),
        Conv2D(64, 3, activation="relu"),
        MaxPooling2D(2),
        Dropout(0.25),
        Flatten(),
        Dense(dense_units, activation="relu"),
        Dropout(0.5),
        Dense(num_classes, activation="softmax"),
    ], input_shape=(in_chans, img_size, img_size))
