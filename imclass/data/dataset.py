"""The in-memory image data set every part of imclass passes around."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from imclass.data.loader import TensorLoader


@dataclass
class ImageDataset:
    """Images as a uint8 tensor (N, C, H, W), int64 labels (N,) and the class names.

    Keeping whole data sets as tensors (CIFAR-10 is 150 MB of pixels) lets training,
    augmentation and k-NN work on batches with no per-sample Python code.
    ``notes`` holds facts a user must not miss (e.g. "test split has 1,000 of the official
    10,000 images"); ``source`` is where the data came from (a file or folder).
    ``mode`` is the tier the images live in (``imclass.data.source``): ``"memory"`` (an ordinary
    tensor) or ``"cache"`` (a tensor over a memory-mapped cache file: its pages belong to the page
    cache, not to the process; read it with ``read``/``batches``/``loader``, which touch only the
    rows asked for, and never copy it whole).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = ""
    split: str = ""
    notes: list[str] = field(default_factory=list)
    source: str = ""
    mode: str = "memory"
    paths: list[str] | None = None  # the file of each image (a folder's), relative to ``source``; None: not from files

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"expected images of shape (N, C, H, W), received shape {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise ValueError(
                f"expected one label per image ({len(self.images)}), received labels of shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        title = "/".join(p for p in (self.name, self.split) if p) or "ImageDataset"
        return (
            f"ImageDataset({title}: {len(self)} images of {c}x{h}x{w} {str(self.images.dtype).replace('torch.', '')}, "
            f"{self.num_classes} classes)"
        )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, indices: Sequence[int] | torch.Tensor | slice, *, split: str | None = None) -> "ImageDataset":
        """A new data set holding only the images at ``indices`` (a slice, indices or a boolean mask).

        A slice shares storage with this data set; indices and masks copy.
        """
        paths = self._subset_paths(indices)
        if isinstance(indices, slice):
            images, labels = self.images[indices], self.labels[indices]
        elif self.mode == "cache":  # a subset of a memory-mapped set is read into memory: say how much
            idx = torch.as_tensor(indices)
            idx = idx.nonzero().flatten() if idx.dtype == torch.bool else idx.long()
            images, labels = self.read(idx), self.labels[idx]
            return dataclasses.replace(self, images=images, labels=labels, classes=list(self.classes),
                                       notes=list(self.notes), split=self.split if split is None else split,
                                       mode="memory", paths=paths)
        elif isinstance(indices, torch.Tensor) and indices.dtype == torch.bool:
            images, labels = self.images[indices], self.labels[indices]
        else:
            idx = torch.as_tensor(indices, dtype=torch.long)
            images, labels = self.images[idx], self.labels[idx]
        return dataclasses.replace(
            self,
            images=images,
            labels=labels,
            classes=list(self.classes),
            notes=list(self.notes),
            split=self.split if split is None else split,
            paths=paths,
        )

    def _subset_paths(self, indices: Any) -> list[str] | None:
        """The ``paths`` of the images at ``indices`` (None when the set has none)."""
        if self.paths is None:
            return None
        if isinstance(indices, slice):
            return self.paths[indices]
        idx = torch.as_tensor(indices)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        return [self.paths[int(i)] for i in idx.reshape(-1).tolist()]

    @property
    def nbytes(self) -> int:
        """Bytes of the stored images (N x C x H x W for uint8)."""
        return self.images.numel() * self.images.element_size()

    def read(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The images at ``indices`` as a new uint8 tensor (n, C, H, W) (``torch.index_select``: one gather,
        and on a memory-mapped set only those rows are read)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return torch.index_select(self.images, 0, idx)

    def batches(self, batch_size: int, indices: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` batches in order (of ``indices`` when given), for evaluation and features."""
        if batch_size < 1:
            raise ValueError(f"expected batch_size >= 1, received batch_size={batch_size}")
        n = len(self) if indices is None else len(indices)
        for start in range(0, n, batch_size):
            if indices is None:
                yield self.images[start : start + batch_size], self.labels[start : start + batch_size]
            else:
                idx = torch.as_tensor(indices[start : start + batch_size], dtype=torch.long)
                yield self.read(idx), self.labels[idx]

    def loader(self, batch_size: int, **options: Any) -> Any:
        """A shuffling ``TensorLoader`` over these images (``options``: its keyword arguments); a
        memory-mapped set stays on the host and only each batch moves to the device."""
        options.setdefault("stage", self.mode != "cache")
        return TensorLoader(self.images, self.labels, batch_size, **options)

    def class_counts(self) -> list[int]:
        """Number of images of each class, in the order of ``classes``."""
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary: size, image shape, dtype, class names, per-class counts, notes."""
        return {
            "name": self.name,
            "split": self.split,
            "size": len(self),
            "image_shape": list(self.image_shape),
            "dtype": str(self.images.dtype).replace("torch.", ""),
            "classes": list(self.classes),
            "class_counts": self.class_counts(),
            "notes": list(self.notes),
            "source": self.source,
        }
