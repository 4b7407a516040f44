"""An AlexNet-style network (Krizhevsky et al. 2012) sized for small (32x32) images.

Same shape as AlexNet: five convolutions (64, 192, 384, 256, 256 filters) with three max-pooling
stages, then two dropout + fully connected layers and the classifier. Kernels are 3x3 with "same"
padding and the pools halve the size (32 -> 16 -> 8 -> 4), because 11x11 stride-4 filters would
swallow a 32x32 image whole.
"""
from __future__ import annotations

from imclass.models._registry import register_model
from imclass.models.sequential import Sequential
from imclass.nn.conv import Conv2D, MaxPooling2D
from imclass.nn.core import Dense, Dropout, Flatten


@register_model
def alexnet(num_classes: int = 10, in_chans: int = 3, img_size: int = 32, hidden: int = 1024,
            dropout: float = 0.5) -> Sequential:
    """AlexNet for 32x32 images: 5 conv layers, 3 max pools, 2 hidden Dense layers of ``hidden`` units."""
    return Sequential([
        Conv2D(64, 3, padding="same", activation="relu"),
        MaxPooling2D(2),
        Conv2D(192, 3, padding="same", activation="relu"),
        MaxPooling2D(2),
        Conv2D(384, 3, padding="same", activation="relu"),
        Conv2D(256, 3, padding="same", activation="relu"),
        Conv2D(256, 3, padding="same", activation="relu"),
        MaxPooling2D(2),
        Flatten(),
        Dropout(dropout),
        Dense(hidden, activation="relu"),
        Dropout(dropout),
        Dense(hidden, activation="relu"),
        Dense(num_classes, activation="softmax"),
    ], input_shape=(in_chans, img_size, img_size))
