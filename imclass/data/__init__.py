"""Data sets as tensors: CIFAR-10, MNIST, Fashion-MNIST, image folders and arrays.

``load(name_or_path, split="train", root=None, image_size=None) -> ImageDataset``: uint8 images
(N, C, H, W), int64 labels (N,) and class names, all in memory. See docs/data.md.
"""
from __future__ import annotations

from imclass.data.arrays import as_images, as_labels
from imclass.data.augment import cutout, random_crop, random_flip
from imclass.data.dataset import ImageDataset
from imclass.data.catalog import CLASSES, canonical_name, clear_cache, from_arrays, load, names, resize_images
from imclass.data.download import DownloadError, fetch, resolve_root
from imclass.data.folder import UnreadableImageError, load_folder, read_image
from imclass.data.loader import TensorLoader
from imclass.data.split import limit_dataset, limit_indices, split_indices, train_val_split

__all__ = [
    "CLASSES",
    "DownloadError",
    "ImageDataset",
    "TensorLoader",
    "UnreadableImageError",
    "as_images",
    "as_labels",
    "canonical_name",
    "clear_cache",
    "cutout",
    "fetch",
    "from_arrays",
    "limit_dataset",
    "limit_indices",
    "load",
    "load_folder",
    "names",
    "random_crop",
    "random_flip",
    "read_image",
    "resize_images",
    "resolve_root",
    "split_indices",
    "train_val_split",
]
