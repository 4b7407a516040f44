"""The in-memory image data set every part of imclass passes around."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class ImageDataset:
    """Images as a uint8 tensor (N, C, H, W), int64 labels (N,) and the class names.

    Keeping whole data sets as tensors (CIFAR-10 is 150 MB of pixels) lets training,
    augmentation and k-NN work on batches with no per-sample Python code.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = ""
    split: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), received shape {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise ValueError(
                f"expected one label per image ({len(self.images)}), received labels of shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: Sequence[int] | torch.Tensor | slice) -> "ImageDataset":
        """A new data set holding only the images at ``indices`` (shares storage for slices)."""
        if isinstance(indices, slice):
            images, labels = self.images[indices], self.labels[indices]
        else:
            idx = torch.as_tensor(indices, dtype=torch.long)
            images, labels = self.images[idx], self.labels[idx]
        return ImageDataset(images, labels, list(self.classes), self.name, self.split, list(self.notes))

    def class_counts(self) -> list[int]:
        """Number of images of each class, in the order of ``classes``."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()
