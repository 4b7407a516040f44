"""What ``fit`` / ``evaluate`` accept, made into tensors: a data set or ``(images, labels)``, integer
or one-hot labels; the per-channel statistics of a set of images; correct predictions in a batch."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from imclass.data.arrays import as_images, as_labels, as_tensor
from imclass.data.dataset import ImageDataset


def as_data(data: Any, name: str = "data") -> tuple[torch.Tensor, torch.Tensor, list[str] | None]:
    """``ImageDataset`` or ``(images, labels)`` -> (images (N, C, H, W), labels (N,), classes or None)."""
    if isinstance(data, ImageDataset):
        return data.images, data.labels, list(data.classes)
    if is_source(data):  # the stream tier: no whole-set tensor; batches come from the source itself
        return data, data.labels, list(data.classes)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        images = as_images(data[0], name=f"{name} images")
        return images, as_targets(data[1], len(images), name=f"{name} labels"), None
    raise TypeError(f"expected {name} as an ImageDataset or an (images, labels) pair, received {type(data).__name__}")


def as_targets(y: Any, n: int, name: str) -> torch.Tensor:
    """Integer labels (N,) via ``as_labels``, or one-hot / soft labels (N, classes) kept as float32."""
    t = as_tensor(y, name=name)
    if t.ndim == 2 and t.shape[1] > 1:
        if len(t) != n:
            raise ValueError(f"expected {n} {name} (one per image), received {len(t)}")
        return t.float()
    return as_labels(t, n, name=name)


def count_correct(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Correct predictions in a batch: argmax of the logits (one output: logit > 0) against the labels
    (the argmax of one-hot / soft labels)."""
    labels = targets.argmax(1) if targets.ndim == 2 else targets
    pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
    return (pred == labels).sum()


def channel_stats(images: Any, chunk: int | None = None, rows: torch.Tensor | None = None) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of images on the [0, 1] scale (uint8 is divided
    by 255). uint8 pixels are summed exactly in int64 over chunks of about 4 MB (no float copy of
    the set, the same figures in any order or tier); ``rows`` restricts them to those images.
    ``images`` may also be a stream source (``read(indices)``): then a seeded sample of 4,096 is used."""
    if not isinstance(images, torch.Tensor):  # a stream source: a sample
        n = len(images) if rows is None else len(rows)
        pick = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:4096].sort().values
        sample = images.read(pick if rows is None else torch.as_tensor(rows)[pick])
        return channel_stats(sample)
    c, h, w = images.shape[1:]
    n = len(images) if rows is None else len(rows)
    chunk = chunk or max(1, (4 << 20) // max(1, c * h * w * 4))
    exact = images.dtype == torch.uint8
    total = torch.zeros(c, dtype=torch.int64 if exact else torch.float64)
    total_sq = torch.zeros_like(total)
    for start in range(0, n, chunk):
        x = images[start : start + chunk] if rows is None else torch.index_select(images, 0, rows[start : start + chunk])
        x = x.cpu().to(torch.int32 if exact else torch.float64)
        total += x.sum(dim=(0, 2, 3), dtype=total.dtype)
        total_sq += x.mul_(x).sum(dim=(0, 2, 3), dtype=total.dtype)
    scale = 255.0 if exact else 1.0
    count = n * h * w
    mean = total.double() / count / scale
    std = (total_sq.double() / count / scale**2 - mean.square()).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()


def is_source(data: Any) -> bool:
    """An ``ImageDataset`` or another image source (the stream tier: ``read``, ``batches``, ``loader``)."""
    return isinstance(data, ImageDataset) or all(hasattr(data, a) for a in ("read", "batches", "loader", "labels"))


def image_batches(images: Any, batch_size: int, rows: torch.Tensor | None = None):
    """uint8 batches of a tensor (slices, or gathers of ``rows``) or of a source, in order."""
    if isinstance(images, torch.Tensor):
        n = len(images) if rows is None else len(rows)
        for start in range(0, n, batch_size):
            if rows is None:
                yield images[start : start + batch_size]
            else:
                yield torch.index_select(images, 0, rows[start : start + batch_size].to(images.device))
    else:
        for x, _ in images.batches(batch_size, rows):
            yield x
