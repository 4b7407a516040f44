"""LeNet-5 (LeCun et al. 1998): two convolution + subsampling stages, then 120-84-classes.

On 32x32 images the convolutions are "valid" (32 -> 28 -> 14 -> 10 -> 5, as in the paper); on
smaller images such as MNIST's 28x28 the first one is "same", which is the paper's padding to 32.
"""
from __future__ import annotations

from imclass.models._registry import register_model
from imclass.models.sequential import Sequential
from imclass.nn.conv import AveragePooling2D, Conv2D, MaxPooling2D
from imclass.nn.core import Dense, Flatten


@register_model
def lenet5(num_classes: int = 10, in_chans: int = 3, img_size: int = 32, activation: str = "tanh",
           pooling: str = "avg") -> Sequential:
    """LeNet-5 with ``tanh`` and average pooling (``activation="relu"``, ``pooling="max"`` for the modern take)."""
    if pooling not in ("avg", "max"):
        raise ValueError(f"expected pooling='avg' or pooling='max', received pooling={pooling!r}")
    pool = AveragePooling2D if pooling == "avg" else MaxPooling2D
    return Sequential([
        Conv2D(6, 5, padding="same" if img_size < 32 else "valid", activation=activation),
        pool(2),
        Conv2D(16, 5, activation=activation),
        pool(2),
        Flatten(),
        Dense(120, activation=activation),
        Dense(84, activation=activation),
        Dense(num_classes, activation="softmax"),
    ], input_shape=(in_chans, img_size, img_size))
