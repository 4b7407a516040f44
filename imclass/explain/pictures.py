"""The explanations' pictures (matplotlib): heatmap overlays and grids of activation maps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from imclass.visualize.grids import to_hwc
from imclass.visualize.plots import pyplot, save_figure


def save_overlay(image: torch.Tensor, heatmap: torch.Tensor, path: str | Path, *, title: str = "",
                 signed: bool = False) -> Path:
    """Write a PNG of three panels: the (C, H, W) image, the (H, W) heatmap, and the heatmap over the
    image. ``signed`` centres the colour map on zero (occlusion: red where hiding the patch lowers the score)."""
    plt = pyplot()
    rgb = to_hwc(image)
    heat = heatmap.detach().float().cpu().numpy()
    if signed:
        lim = float(np.abs(heat).max()) or 1.0
        cmap, vmin, vmax = "bwr", -lim, lim
    else:
        cmap, vmin, vmax = "jet", float(heat.min()), float(heat.max()) if heat.max() > heat.min() else float(heat.min()) + 1
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4), dpi=100)
    axes[0].imshow(rgb, interpolation="nearest")
    axes[0].set_title("image", fontsize=9)
    im = axes[1].imshow(heat, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    axes[1].set_title("map", fontsize=9)
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    axes[2].imshow(rgb, interpolation="nearest")
    axes[2].imshow(heat, cmap=cmap, vmin=vmin, vmax=vmax, alpha=0.5, interpolation="bilinear")
    axes[2].set_title("overlay", fontsize=9)
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def save_map_grid(maps: torch.Tensor, path: str | Path, *, title: str = "", cols: int = 8,
                  image: torch.Tensor | None = None) -> Path:
    """Write a PNG grid of (K, h, w) maps (each on its own colour scale, viridis), after ``image``."""
    plt = pyplot()
    maps = maps.detach().float().cpu()
    tiles = ([("image", None)] if image is not None else []) + [(f"{i}", m) for i, m in enumerate(maps)]
    cols = max(1, min(cols, len(tiles)))
    rows = (len(tiles) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.2, rows * 1.3 + 0.4), dpi=100, squeeze=False)
    for ax, (label, m) in zip(axes.flat, tiles):
        if m is None:
            ax.imshow(to_hwc(image), interpolation="nearest")
        else:
            ax.imshow(m.numpy(), cmap="viridis", interpolation="nearest")
        ax.set_title(label, fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
