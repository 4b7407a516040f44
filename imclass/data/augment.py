"""Data augmentation on whole batches (N, C, H, W), vectorised and seeded by a torch.Generator.

Every function draws all its random numbers for the batch at once from ``generator`` (on the
batch's device), so the same generator state gives the same output, and there is no per-image
Python loop. An augmentation used by ``Classifier.fit`` is any callable
``(images, generator, epoch) -> images``; :class:`CropFlip` is the standard CIFAR one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Augment = Callable[[torch.Tensor, torch.Generator, int], torch.Tensor]

_PAD_MODES = ("reflect", "zeros")


def _check_batch(x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images (N, C, H, W), received shape {tuple(x.shape)}")


def random_crop(
    x: torch.Tensor, padding: int, generator: torch.Generator | None = None, *, mode: str = "reflect"
) -> torch.Tensor:
    """Pad each image by ``padding`` pixels and crop it back at a random offset (a random shift).

    ``mode`` is ``"reflect"`` (mirror the border, as airbench) or ``"zeros"`` (Keras/torchvision).
    The batch is padded once, then every crop is one ``gather`` with per-image offsets.
    """
    _check_batch(x)
    if padding < 0:
        raise ValueError(f"expected padding >= 0, received padding={padding}")
    if mode not in _PAD_MODES:
        raise ValueError(f"expected mode in {_PAD_MODES}, received mode={mode!r}")
    if padding == 0:
        return x
    n, c, h, w = x.shape
    if mode == "reflect" and padding >= min(h, w):
        raise ValueError(f"expected padding < image size {min(h, w)} for reflect padding, received padding={padding}")
    padded = F.pad(x, (padding,) * 4, mode="reflect" if mode == "reflect" else "constant")  # (N, C, H+2p, W+2p)
    wp = w + 2 * padding
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=_gen_device(generator, x))
    offsets = offsets.to(x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w)  # (N, 1, H*W) into (H+2p)*(W+2p)
    out = padded.reshape(n, c, -1).gather(2, flat.expand(n, c, h * w))  # (N, C, H*W)
    return out.reshape(n, c, h, w)


def random_flip(x: torch.Tensor, generator: torch.Generator | None = None, *, p: float = 0.5) -> torch.Tensor:
    """Mirror each image left-right with probability ``p``."""
    _check_batch(x)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"expected 0 <= p <= 1, received p={p}")
    flip = torch.rand(len(x), generator=generator, device=_gen_device(generator, x)).to(x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator | None = None, *, value: float = 0.0) -> torch.Tensor:
    """Fill one ``size`` x ``size`` square per image with ``value`` (DeVries & Taylor, 2017).

    The square's centre is uniform over the image, so squares may be cut by the border.
    """
    _check_batch(x)
    if size < 0:
        raise ValueError(f"expected size >= 0, received size={size}")
    if size == 0:
        return x
    n, _, h, w = x.shape
    dev = _gen_device(generator, x)
    cy = torch.randint(0, h, (n,), generator=generator, device=dev).to(x.device)
    cx = torch.randint(0, w, (n,), generator=generator, device=dev).to(x.device)
    top, left = cy - size // 2, cx - size // 2
    r = torch.arange(h, device=x.device)[None, :] - top[:, None]  # (N, H)
    c = torch.arange(w, device=x.device)[None, :] - left[:, None]  # (N, W)
    inside = ((r >= 0) & (r < size))[:, :, None] & ((c >= 0) & (c < size))[:, None, :]  # (N, H, W)
    return x.masked_fill(inside[:, None], value)


def _gen_device(generator: torch.Generator | None, x: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else x.device


@dataclass
class CropFlip:
    """Random crop with padding, then a random horizontal flip, then optional cutout.

    Applied by ``Classifier.fit`` to normalised float batches on the device.
    """

    padding: int = 4
    mode: str = "reflect"
    flip: bool = True
    cutout: int = 0

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, epoch: int = 0) -> torch.Tensor:
        x = random_crop(x, self.padding, generator, mode=self.mode)
        if self.flip:
            x = random_flip(x, generator)
        if self.cutout:
            x = cutout(x, self.cutout, generator)
        return x


_NAMED = {
    "crop_flip": lambda: CropFlip(),
    "crop": lambda: CropFlip(flip=False),
    "flip": lambda: CropFlip(padding=0),
    "crop_flip_cutout": lambda: CropFlip(cutout=8),
}


def make_augment(spec: str | Augment | None) -> Augment | None:
    """Resolve ``None``, a name (``"crop_flip"``, ``"crop"``, ``"flip"``, ``"crop_flip_cutout"``) or a callable."""
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str) and spec in _NAMED:
        return _NAMED[spec]()
    raise ValueError(f"expected augment None, a callable or one of {sorted(_NAMED)}, received {spec!r}")
