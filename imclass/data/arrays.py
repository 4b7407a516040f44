"""Turning whatever the user holds (numpy arrays, tensors, HWC or CHW) into (N, C, H, W) tensors."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

_CHANNEL_SIZES = (1, 3, 4)

__all__ = ["as_images", "as_labels", "as_tensor", "is_channels_last"]


def is_channels_last(shape: Any) -> bool:
    """The one channel-order rule: an image shape ``(H, W, C)`` or ``(C, H, W)`` (no batch) is channels-last
    when its last entry is 1, 3 or 4 and its first is not (Keras and numpy write ``(32, 32, 3)``)."""
    return len(shape) == 3 and shape[-1] in _CHANNEL_SIZES and shape[0] not in _CHANNEL_SIZES


def as_tensor(x: Any, *, name: str = "x", lists: bool = True) -> torch.Tensor:
    """The one conversion of what a user holds into a tensor (images, labels, Keras's ``x``/``y``).

    A ``torch.Tensor`` is returned as is; a numpy array as a tensor sharing its memory (copied only
    when not contiguous); with ``lists=True`` also what numpy reads as numbers (nested lists, tuples,
    ranges, objects with ``__array__``). Anything that is not numeric (Python objects, strings, None)
    raises a ``TypeError`` naming ``name`` and what was received.
    """
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray) or (lists and x is not None and not isinstance(x, (str, bytes, dict))):
        arr = np.asarray(x)
        if arr.dtype.kind not in "biuf":
            what = "Python objects" if arr.dtype == object else f"{arr.dtype}"
            raise TypeError(f"expected {name} as a numeric array, received an array of {what}")
        return torch.from_numpy(np.ascontiguousarray(arr))
    kinds = "a torch.Tensor, numpy array or list of numbers" if lists else "a torch.Tensor or numpy array"
    raise TypeError(f"expected {name} as {kinds}, received {type(x).__name__}")


def as_images(x: Any, *, name: str = "images") -> torch.Tensor:
    """Return ``x`` as a 4-D tensor (N, C, H, W), keeping its dtype (uint8 stays uint8).

    Accepted: torch tensors or numpy arrays of shape (N, C, H, W), (N, H, W, C) (channels last,
    the Keras/numpy convention: recognised when the last axis has 1, 3 or 4 entries and the
    second does not), or (N, H, W) (grey images). Anything else raises a ValueError naming the shape.
    """
    t = as_tensor(x, name=name, lists=False)
    if t.ndim == 3:
        t = t.unsqueeze(1)
    if t.ndim != 4:
        raise ValueError(f"expected {name} of shape (N, C, H, W) or (N, H, W, C), received shape {tuple(t.shape)}")
    if is_channels_last(tuple(t.shape[1:])):
        t = t.permute(0, 3, 1, 2).contiguous()
    return t


def as_labels(y: Any, n: int | None = None, *, name: str = "labels") -> torch.Tensor:
    """Return ``y`` as an int64 tensor of shape (N,), checking it matches ``n`` images."""
    t = as_tensor(y, name=name)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1:
        raise ValueError(f"expected {name} of shape (N,), received shape {tuple(t.shape)}")
    if t.is_floating_point():
        if not torch.equal(t, t.round()):
            raise ValueError(f"expected integer class {name}, received non-integer values")
    t = t.long()
    if n is not None and len(t) != n:
        raise ValueError(f"expected {n} {name} (one per image), received {len(t)}")
    return t
