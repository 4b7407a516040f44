"""Data sets as tensors: CIFAR-10, MNIST, Fashion-MNIST, image folders and arrays.

``load(name_or_path, split="train", root=None, image_size=None) -> ImageDataset``.
"""
from __future__ import annotations

from imclass.data.arrays import as_images, as_labels
from imclass.data.dataset import ImageDataset

__all__ = ["ImageDataset", "as_images", "as_labels", "load"]


def load(name_or_path, split: str = "train", root=None, image_size=None) -> ImageDataset:  # replaced by data helper
    from imclass.data.datasets import load as _load

    return _load(name_or_path, split=split, root=root, image_size=image_size)
