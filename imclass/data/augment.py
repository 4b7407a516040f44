"""Data augmentation on whole batches (N, C, H, W), vectorised and seeded by a torch.Generator.

Every function draws all its random numbers for the batch at once from ``generator`` (on the
batch's device), so the same generator state gives the same output, and there is no per-image
Python loop. An augmentation used by ``Classifier.fit`` is any callable
``(images, generator, epoch) -> images``; :class:`CropFlip` is the standard CIFAR one,
:class:`RandomResizedCrop` the ImageNet one (fine-tuning a pretrained backbone).
"""
from __future__ import annotations

import math
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


def crop_boxes(n: int, h: int, w: int, generator: torch.Generator | None = None, *,
               scale: tuple[float, float] = (0.08, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[torch.Tensor, ...]:
    """``n`` boxes of torchvision's ``RandomResizedCrop.get_params`` in an ``h`` x ``w`` image, drawn
    together: area ``scale`` x h x w, aspect ratio log-uniform in ``ratio``, 10 tries per box, then
    the whole image with its ratio clamped into ``ratio``, centred. Returns (top, left, height,
    width), each float64 (n,) holding whole numbers."""
    tries = 10
    dev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand((4, n, tries), generator=generator, device=dev, dtype=torch.float64).cpu()  # area, ratio, top, left
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    cw = torch.sqrt(area * aspect).round()
    ch = torch.sqrt(area / aspect).round()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)  # (n, tries)
    first = torch.where(ok.any(1), ok.double().argmax(1), torch.full((n,), -1))
    in_ratio = w / h  # torchvision's fallback: the whole image, its aspect ratio clamped into `ratio`, centred
    fw, fh = (w, round(w / ratio[0])) if in_ratio < ratio[0] else ((round(h * ratio[1]), h) if in_ratio > ratio[1] else (w, h))
    pick = first.clamp(min=0)[:, None]
    found = first >= 0
    bw = torch.where(found, cw.gather(1, pick)[:, 0], torch.tensor(float(fw), dtype=torch.float64))
    bh = torch.where(found, ch.gather(1, pick)[:, 0], torch.tensor(float(fh), dtype=torch.float64))
    top = torch.where(found, (u[2].gather(1, pick)[:, 0] * (h - bh + 1)).floor(), (h - bh) // 2)
    left = torch.where(found, (u[3].gather(1, pick)[:, 0] * (w - bw + 1)).floor(), (w - bw) // 2)
    return top, left, bh, bw


def random_resized_crop(
    x: torch.Tensor,
    size: int | tuple[int, int],
    generator: torch.Generator | None = None,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = False,
) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop`` on a whole batch: each image gets its own box of
    ``scale`` x its area and aspect ratio in ``ratio`` (log-uniform; 10 tries, then the centre crop
    with the ratio clamped, as torchvision), resized bilinearly to ``size``; ``flip`` also mirrors
    each image with probability 1/2. (N, C, H, W) -> (N, C, size, size).

    The boxes are drawn together from ``generator`` and applied in one ``affine_grid`` +
    ``grid_sample`` (box edges map to the output's edges: ``align_corners=False``), no per-image loop.
    A uint8 batch comes back uint8 (rounded)."""
    _check_batch(x)
    out_h, out_w = (size, size) if isinstance(size, int) else size
    if out_h < 1 or out_w < 1:
        raise ValueError(f"expected a crop size >= 1, received size={size}")
    if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"expected 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1], "
                         f"received scale={scale}, ratio={ratio}")
    n, c, h, w = x.shape
    top, left, bh, bw = crop_boxes(n, h, w, generator, scale=scale, ratio=ratio)
    dev = _gen_device(generator, x)
    flips = torch.rand(n, generator=generator, device=dev).cpu() < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    # the box [left, left + bw) x [top, top + bh) onto the output: normalised coordinates (align_corners=False)
    theta = torch.zeros((n, 2, 3), dtype=torch.float64)
    theta[:, 0, 0] = bw / w * torch.where(flips, -1.0, 1.0).double()
    theta[:, 0, 2] = 2 * (left + bw / 2) / w - 1
    theta[:, 1, 1] = bh / h
    theta[:, 1, 2] = 2 * (top + bh / 2) / h - 1
    src = x if x.is_floating_point() else x.float()
    grid = F.affine_grid(theta.to(device=x.device, dtype=src.dtype), [n, c, out_h, out_w], align_corners=False)
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (N, C, out_h, out_w)
    return out if x.is_floating_point() else out.round_().clamp_(0, 255).to(x.dtype)


@dataclass
class RandomResizedCrop:
    """:func:`random_resized_crop` to ``size`` (and a random horizontal flip) as a ``Classifier.fit``
    augmentation: timm's and torchvision's training transform for ImageNet backbones. Its input may
    be larger than ``size`` (fine-tuning reads the training images at the preprocessing's resize
    size, e.g. 256 for a 224 crop, so the crops can reach the margin the centre crop cuts off)."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, epoch: int = 0) -> torch.Tensor:
        return random_resized_crop(x, self.size, generator, scale=self.scale, ratio=self.ratio, flip=self.flip)


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
