"""Grids of images with a caption under each tile (report examples, neighbours, explanations), via matplotlib."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from imclass.visualize.plots import pyplot, save_figure


def to_hwc(img: torch.Tensor | np.ndarray) -> np.ndarray:
    """(C, H, W) uint8 or float on [0, 1] -> (H, W, 3) uint8 for drawing (grey images repeated to RGB)."""
    img = torch.as_tensor(img).detach().cpu()
    if img.is_floating_point():
        img = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    arr = img.permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def save_captioned_grid(
    images: Sequence[torch.Tensor],
    captions: Sequence[str],
    path: str | Path,
    *,
    cols: int = 8,
    title: str = "",
    tile_inches: float = 1.35,
    caption_colors: Sequence[str] | None = None,
) -> Path:
    """Write a PNG grid of (C, H, W) images, ``cols`` per row, each with its caption (e.g.
    "cat -> dog 0.97") underneath; ``caption_colors`` colours each caption."""
    plt = pyplot()

    images = list(images)
    if not images:
        raise ValueError("expected at least one image to draw, received none")
    if len(captions) != len(images):
        raise ValueError(f"expected one caption per image, received {len(captions)} for {len(images)} images")
    cols = max(1, min(cols, len(images)))
    rows = (len(images) + cols - 1) // cols
    lines = max(str(c).count("\n") + 1 for c in captions)
    fig, axes = plt.subplots(rows, cols, dpi=100, squeeze=False,
                             figsize=(cols * tile_inches, rows * (tile_inches + 0.14 * lines + 0.1) + (0.4 if title else 0)))
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(to_hwc(images[i]), interpolation="nearest")
            color = caption_colors[i] if caption_colors else "black"
            ax.text(0.5, -0.03, captions[i], transform=ax.transAxes, ha="center", va="top", fontsize=8, color=color)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
