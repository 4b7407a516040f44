"""Keras's ``to_categorical``: integer class labels -> one-hot rows."""
from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["to_categorical"]


def to_categorical(y: Any, num_classes: int | None = None, dtype: str = "float32") -> np.ndarray:
    """One-hot encode integer labels ``y`` (any shape; a trailing axis of size 1 is dropped, as Keras
    does) into ``y.shape + (num_classes,)``; ``num_classes`` defaults to ``max(y) + 1``.

    >>> to_categorical([0, 2, 1], 3).tolist()
    [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]
    """
    arr = np.asarray(y.cpu() if hasattr(y, "cpu") else y)
    if arr.dtype.kind == "f":
        if not np.array_equal(arr, np.round(arr)):
            raise ValueError("to_categorical expects integer class labels, received non-integer values")
    elif arr.dtype.kind not in "iub":
        raise ValueError(f"to_categorical expects integer class labels, received dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.ndim > 1 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.size and arr.min() < 0:
        raise ValueError(f"to_categorical expects labels >= 0, received {int(arr.min())}")
    top = int(arr.max()) + 1 if arr.size else 0
    if num_classes is None:
        num_classes = top
    elif isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"expected a positive integer for num_classes, received num_classes={num_classes!r}")
    elif top > num_classes:
        raise ValueError(f"to_categorical: label {top - 1} does not fit num_classes={num_classes} (labels 0..{num_classes - 1})")
    out = np.zeros((*arr.shape, int(num_classes)), dtype=dtype)
    np.put_along_axis(out, arr[..., None], 1, axis=-1)
    return out
