"""Shapes of the layer machinery: the one input-shape rule, the course's convolution arithmetic, the
one check of a batch against a model's input shape, and the argument checks every layer shares.


Input shapes (without the batch dimension) follow one rule:

* an int or a 1-tuple is a flat feature size (``input_dim``);
* a 3-tuple whose last entry is 1, 3 or 4 and whose first entry is not is channels-last
  ``(H, W, C)`` as the course writes it, and becomes ``(C, H, W)``;
* any other 3-tuple is channels-first ``(C, H, W)`` as is;
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Iterable, Sequence

import torch

from imclass.data.arrays import is_channels_last

__all__ = ["Shape", "adapt_flat_input", "check_input_shape", "check_int", "check_padding", "conv_output_size", "format_shape", "int_pair",
           "is_int", "needs_image", "to_channels_first"]

Shape = tuple[int, ...]


def to_channels_first(shape: int | Sequence[int]) -> Shape:
    """Normalise a user input shape to channels-first ``(C, H, W)`` or flat ``(features,)`` (see module doc)."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if isinstance(shape, bool):
        raise ValueError(f"expected an input shape such as (32, 32, 3), (3, 32, 32) or 784, received {shape!r}")
    if isinstance(shape, int):
        shape = (shape,)
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise ValueError(
            f"expected an input shape such as (32, 32, 3), (3, 32, 32) or 784, received {shape!r}"
        ) from None
    if not 1 <= len(dims) <= 3 or any(d < 1 for d in dims):
        raise ValueError(
            f"expected an input shape (features,), (H, W), (H, W, C) or (C, H, W) of positive sizes, received {shape!r}"
        )
    if len(dims) == 2:
        return (1, *dims)
    if is_channels_last(dims):
        return (dims[2], dims[0], dims[1])  # (H, W, C) -> (C, H, W)
    return dims


def conv_output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0) -> int:
    """The course's formula ``(W - F + 2P) / S + 1`` (rounded down, as every framework does).

    ``conv_output_size(7, 3, 1) == 5`` and ``conv_output_size(7, 3, 2) == 3``.
    """
    for name, value, low in (("size", size, 1), ("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
        check_int(name, value, low)
    if kernel_size > size + 2 * padding:
        raise ValueError(f"a {kernel_size}-wide filter does not fit a {size}-wide input with padding {padding}")
    return (size - kernel_size + 2 * padding) // stride + 1


def format_shape(shape: Iterable[int]) -> str:
    """A shape with its batch dimension, for messages: ``(3, 32, 32)`` -> ``"(N, 3, 32, 32)"``."""
    return "(" + ", ".join(["N", *(str(d) for d in shape)]) + ")"


def is_int(value: Any, low: int = 1) -> bool:
    """True for an integer (not a bool) of at least ``low``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def check_int(name: str, value: Any, low: int = 1) -> int:
    """``value`` as an int when it is an integer >= ``low``, else a ``ValueError`` naming ``name``."""
    if not is_int(value, low):
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"expected {kind} for {name}, received {name}={value!r}")
    return int(value)


def int_pair(name: str, value: Any) -> tuple[int, int]:
    """A kernel size or stride given as one int or a pair -> ``(a, b)``; else a ``ValueError`` naming ``name``."""
    if is_int(value):
        return (int(value), int(value))
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(is_int(v) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"expected a positive integer or a pair of them for {name}, received {name}={value!r}")


def check_padding(value: Any) -> str:
    """``"valid"`` or ``"same"`` as given; anything else is a ``ValueError``."""
    if value not in ("valid", "same"):
        raise ValueError(f"expected padding='valid' or padding='same', received padding={value!r}")
    return value


def needs_image(layer: str, shape: Shape) -> None:
    """A ``ValueError`` when ``layer`` (a 2-D layer's name) would receive non-image input of ``shape``."""
    if len(shape) != 3:
        raise ValueError(f"{layer} expects image input (N, C, H, W), received {format_shape(shape)} from the previous layer")



def adapt_flat_input(x: torch.Tensor, expected: Shape) -> torch.Tensor:
    """Flat features reach a model as ``(N, F)``, or as ``(N, 1, 1, F)`` one-row grey images (the
    form in which the image-based engine carries them, see ``imclass.models.keras_training``)."""
    if len(expected) == 1 and x.ndim == 4 and tuple(x.shape[1:]) == (1, 1, expected[0]):
        return x.flatten(1)
    return x


def check_input_shape(x: torch.Tensor, expected: Shape, *,
                      flat_hint: str = "flatten the input first (x.flatten(1))") -> None:
    """The one check of a batch against a model's input shape (without batch): a ``ValueError`` saying
    what was expected and received, with the likely fix (channels-last images, unflattened features).
    Flat features may also come as ``(N, 1, 1, F)`` (see ``adapt_flat_input``)."""
    received = tuple(x.shape[1:])
    if received == expected or (len(expected) == 1 and received == (1, 1, expected[0])):
        return
    message = f"expected input of shape {format_shape(expected)}, received {format_shape(received)}"
    if len(expected) == 3 and len(received) == 3 and received == (expected[1], expected[2], expected[0]):
        message += "; the model takes channels-first images (N, C, H, W): use x.permute(0, 3, 1, 2)"
    elif len(expected) == 1 and math.prod(received) == expected[0]:
        message += "; " + flat_hint
    raise ValueError(message)
