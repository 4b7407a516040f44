"""Test-time augmentation: average a model's logits over flipped and shifted views of each image.

Levels (airbench's convention)::

    0  the image only
    1  0.5 * (image) + 0.5 * (mirror image)
    2  0.5 * level1(image) + 0.25 * level1(shift up-left 1 px) + 0.25 * level1(shift down-right 1 px)

Shifts pad by reflection, so a shifted view is still a full natural-looking image. Level 2
costs six forward passes and typically adds ~0.5-1 point of CIFAR-10 accuracy for a
network trained with flip + translate augmentation.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["choose_tta", "tta_logits", "tta_views", "tta_name", "TTA_LEVELS", "TTA_NAMES", "mirror", "translate"]

TTA_LEVELS = (0, 1, 2)
TTASpec = Union[int, str, None]
_NAMES = {"none": 0, "flip": 1, "mirror": 1, "flip_translate": 2, "mirror_translate": 2}
TTA_NAMES = ("none", "flip", "flip_translate")  # the canonical name of each level, as model files record it


def mirror(x: torch.Tensor) -> torch.Tensor:
    """Left-right mirror of a batch (N, C, H, W)."""
    return x.flip(-1)


def translate(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift a batch (N, C, H, W) by (dy, dx) pixels, filling the border by reflection.

    Positive ``dy``/``dx`` move the content down/right: the output pixel (i, j) is the input
    pixel (i - dy, j - dx) (reflected at the border).
    """
    p = max(abs(dy), abs(dx))
    if p == 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (p, p, p, p), mode="reflect")  # (N, C, H+2p, W+2p)
    return padded[..., p - dy : p - dy + h, p - dx : p - dx + w]


def resolve_level(tta: TTASpec) -> int:
    """``None``/``0``/``"none"`` -> 0, ``"flip"`` -> 1, ``"flip_translate"`` -> 2; ints pass through."""
    if tta is None or tta is False:
        return 0
    if tta is True:
        return 2
    if isinstance(tta, str):
        if tta.lower() not in _NAMES:
            raise ValueError(f"expected tta in {sorted(_NAMES)} or a level {TTA_LEVELS}, received tta={tta!r}")
        return _NAMES[tta.lower()]
    if int(tta) not in TTA_LEVELS:
        raise ValueError(f"expected a tta level in {TTA_LEVELS}, received tta={tta!r}")
    return int(tta)


def tta_name(tta: TTASpec) -> str:
    """The canonical name (``"none"``, ``"flip"``, ``"flip_translate"``) of a TTA level or name."""
    return TTA_NAMES[resolve_level(tta)]


def choose_tta(recorded: str | None, flag: bool | str | None, *, knn: bool = False) -> str:
    """The TTA a saved model is run with, by the ``--tta/--no-tta`` rule of evaluate, predict, serve and
    challenge: ``None`` = what its model file records (``recorded``), ``False`` = none, ``True`` = the
    recorded one or else flip_translate, a name = that one. A k-NN has no views to average: ``"none"``,
    and asking it for TTA is an error."""
    if knn:
        if flag not in (None, False, "none"):
            raise ValueError("--tta applies to neural networks; a k-NN model predicts each image as it is")
        return "none"
    if flag is None:
        return tta_name(recorded) if recorded else "none"
    if flag is False:
        return "none"
    if flag is True:
        return tta_name(recorded) if recorded not in (None, "none") else "flip_translate"
    return tta_name(flag)


def tta_views(x: torch.Tensor, tta: TTASpec = 2) -> list[tuple[float, torch.Tensor]]:
    """The (weight, view) pairs whose weighted logit sum is the TTA prediction; weights sum to 1."""
    level = resolve_level(tta)
    if level == 0:
        return [(1.0, x)]
    if level == 1:
        return [(0.5, x), (0.5, mirror(x))]
    shifted = [translate(x, -1, -1), translate(x, 1, 1)]
    views = [(0.25, x), (0.25, mirror(x))]
    for s in shifted:
        views += [(0.125, s), (0.125, mirror(s))]
    return views


@torch.no_grad()
def tta_logits(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tta: TTASpec = 2,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Weighted average of ``model``'s logits over the TTA views of the float batch ``x`` (N, C, H, W).

    ``batch_size`` splits large inputs into chunks (each chunk runs all its views).
    """
    if x.ndim != 4:
        raise ValueError(f"expected float images (N, C, H, W), received shape {tuple(x.shape)}")
    if batch_size is not None and batch_size < len(x):
        return torch.cat([tta_logits(model, chunk, tta) for chunk in x.split(batch_size)])
    out = None
    for weight, view in tta_views(x, tta):
        logits = model(view).float() * weight
        out = logits if out is None else out + logits
    return out
