"""The course's layers and ``Sequential`` (public face: it re-exports; the code lives in ``imclass.nn``
and ``imclass.models.sequential``).

::

    from imclass.layers import Conv2D, Dense, Dropout, Flatten, MaxPooling2D, Sequential

    model = Sequential([
        Conv2D(32, 3, padding="same", activation="relu", input_shape=(32, 32, 3)),
        MaxPooling2D(2),
        Flatten(),
        Dense(10, activation="softmax"),
    ])

Input shapes (without the batch dimension) follow one rule (``imclass.nn.shapes.to_channels_first``):

* an int or a 1-tuple is a flat feature size (``input_dim``);
* a 3-tuple whose last entry is 1, 3 or 4 and whose first entry is not is channels-last
  ``(H, W, C)`` as the course writes it, and becomes ``(C, H, W)``;
* any other 3-tuple is channels-first ``(C, H, W)`` as is;
* a 2-tuple ``(H, W)`` is a one-channel image ``(1, H, W)``.
"""
from __future__ import annotations

from imclass.activations import Maxout
from imclass.models.keras_training import KerasMethods
from imclass.models.sequential import Sequential
from imclass.nn.conv import AveragePooling2D, Conv2D, GlobalAvgPool2d, GlobalAveragePooling2D, MaxPooling2D, SpatialMean
from imclass.nn.core import Activation, BatchNormalization, Dense, Dropout, Flatten, LeakyReLU
from imclass.nn.layer import Layer, final_activation_of
from imclass.nn.merge import Add, Concatenate
from imclass.nn.model_layer import ModelLayer
from imclass.nn.shapes import Shape, adapt_flat_input, conv_output_size, to_channels_first
from imclass.nn.symbolic import Input

KerasModel = KerasMethods  # the former name of Keras's model methods (compile/fit/evaluate/predict/save)

__all__ = [
    "Activation",
    "Add",
    "AveragePooling2D",
    "BatchNormalization",
    "Concatenate",
    "Conv2D",
    "Dense",
    "Dropout",
    "Flatten",
    "GlobalAveragePooling2D",
    "Input",
    "KerasModel",
    "Layer",
    "LeakyReLU",
    "MaxPooling2D",
    "Maxout",
    "ModelLayer",
    "Sequential",
    "conv_output_size",
    "to_channels_first",
]
