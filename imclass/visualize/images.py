"""Grids of images written as PNG (the lecture's CIFAR-10 and nearest-neighbour pictures)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

TITLE_PX = 14  # font size of a grid's title


def _to_hwc_uint8(img: torch.Tensor) -> np.ndarray:
    # (C, H, W) uint8 or float in [0, 1] -> (H, W, 3) uint8
    if img.is_floating_point():
        img = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    arr = img.permute(1, 2, 0).cpu().numpy()
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr[:, :, :3]


def save_image_grid(
    rows: Sequence[Sequence[torch.Tensor]],
    path: str | Path,
    *,
    row_labels: Sequence[str] | None = None,
    scale: int = 2,
    pad: int = 2,
    label_width: int = 90,
    title: str | None = None,
) -> Path:
    """Write a PNG grid: one row per list of (C, H, W) images, with an optional label per row and an
    optional ``title`` line above the grid (wrapped to the grid's width).

    Rows may have different lengths; images in a grid must share one size.
    """
    rows = [list(r) for r in rows]
    if not rows or not any(rows):
        raise ValueError("expected at least one image to draw, received none")
    first = next(img for r in rows for img in r)
    h, w = first.shape[-2] * scale, first.shape[-1] * scale
    ncols = max(len(r) for r in rows)
    left = label_width if row_labels else 0
    width = left + ncols * (w + pad) + pad
    font = ImageFont.load_default(size=TITLE_PX)
    lines = _wrap(title, font, max(width, 320) - 8) if title else []
    top = len(lines) * (TITLE_PX + 4) + (6 if lines else 0)
    canvas = Image.new("RGB", (max(width, 320) if lines else width, top + len(rows) * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(lines):
        draw.text((4, 3 + k * (TITLE_PX + 4)), line, fill="black", font=font)
    for i, row in enumerate(rows):
        y = top + pad + i * (h + pad)
        if row_labels:
            draw.text((4, y + h // 2 - 5), str(row_labels[i])[:14], fill="black")
        for j, img in enumerate(row):
            tile = Image.fromarray(_to_hwc_uint8(img)).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (left + pad + j * (w + pad), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """``text`` cut into lines that fit ``width`` pixels in ``font`` (at word boundaries)."""
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and font.getlength(trial) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return [*lines, line] if line else lines
