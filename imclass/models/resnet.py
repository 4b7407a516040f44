"""Residual networks for CIFAR-sized images.

* ``resnet20/32/44/56/110``: He et al. 2016 (section 4.2): a 3x3 stem of 16 filters, three stages
  of ``n`` basic blocks with 16, 32, 64 filters (depth ``6n + 2``), global average pooling and a
  linear classifier. ``shortcut="A"`` (the paper's CIFAR choice) subsamples and zero-pads the
  identity when the shape changes, adding no parameters; ``shortcut="B"`` uses a 1x1 convolution.
* ``resnet18_cifar``: ResNet-18 widths (64-512) and option B shortcuts with a 3x3 stem and no
  max pool, the common CIFAR adaptation (11.2 M parameters).
* ``wrn16_4``, ``wrn28_10``: wide residual networks (Zagoruyko & Komodakis 2016), pre-activation
  blocks ``k`` times wider, ``(depth - 4) / 6`` blocks per stage, optional dropout between the convs.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from imclass.models._registry import register_model

__all__ = ["BasicBlock", "CifarResNet", "PreActBlock"]


class PadShortcut(nn.Module):
    """Option A shortcut: keep every ``stride``-th pixel, zero-pad the new channels (no parameters)."""

    def __init__(self, in_chans: int, out_chans: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad = (out_chans - in_chans) // 2, out_chans - in_chans - (out_chans - in_chans) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (N, C, H, W) -> (N, C, H/s, W/s)
        return F.pad(x, (0, 0, 0, 0, *self.pad))  # (N, C, ...) -> (N, C + pad, ...)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers added to a shortcut, then ReLU (He et al. 2016, post-activation)."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chans)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.act2 = nn.ReLU(inplace=True)
        if stride == 1 and in_chans == out_chans:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_chans, out_chans, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_chans, out_chans, 1, stride, bias=False), nn.BatchNorm2d(out_chans))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3, BN-ReLU-(dropout)-conv3x3, added to the input (1x1 conv when the shape changes)."""

    def __init__(self, in_chans: int, out_chans: int, stride: int = 1, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chans)
        self.act1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_chans, out_chans, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chans)
        self.act2 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate)
        self.conv2 = nn.Conv2d(out_chans, out_chans, 3, 1, 1, bias=False)
        self.project = stride != 1 or in_chans != out_chans
        self.shortcut = nn.Conv2d(in_chans, out_chans, 1, stride, bias=False) if self.project else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv2(self.drop(self.act2(self.bn2(self.conv1(pre)))))
        return out + self.shortcut(pre if self.project else x)  # the projection sees the activated input


class CifarResNet(nn.Module):
    """A 3x3 stem, stages of residual blocks (stride 2 at each new stage), average pooling, linear classifier.

    ``preact=False``: post-activation ``BasicBlock``s with ``shortcut`` "A" or "B" (He et al.);
    ``preact=True``: ``PreActBlock``s (dropout ``block_drop_rate`` inside), a bare conv stem and a
    final BN-ReLU (wide ResNets). ``drop_rate`` is dropout before the classifier.
    """

    def __init__(self, depths: Sequence[int], widths: Sequence[int], num_classes: int = 10, in_chans: int = 3,
                 shortcut: str = "A", drop_rate: float = 0.0, stem_width: int | None = None, preact: bool = False,
                 block_drop_rate: float = 0.0):
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"expected shortcut='A' or shortcut='B', received shortcut={shortcut!r}")
        if len(depths) != len(widths) or not depths:
            raise ValueError(f"expected as many stage depths as widths, received depths={depths}, widths={widths}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"expected an integer >= 0 for num_classes, received num_classes={num_classes!r}")
        if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
            raise ValueError(f"expected a positive integer for in_chans, received in_chans={in_chans!r}")
        chans = stem_width or widths[0]
        conv = nn.Conv2d(in_chans, chans, 3, 1, 1, bias=False)
        self.stem = conv if preact else nn.Sequential(conv, nn.BatchNorm2d(chans), nn.ReLU(inplace=True))
        stages = []
        for i, (depth, width) in enumerate(zip(depths, widths)):
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PreActBlock(chans, width, stride, block_drop_rate) if preact
                              else BasicBlock(chans, width, stride, shortcut))
                chans = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        # pre-activation nets end with BN-ReLU: the last block's sum is not normalised otherwise
        self.final = nn.Sequential(nn.BatchNorm2d(chans), nn.ReLU(inplace=True)) if preact else nn.Identity()
        self.num_features = chans
        self.drop = nn.Dropout(drop_rate)
        self.fc: nn.Module = nn.Linear(chans, num_classes) if num_classes else nn.Identity()
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W) -> (N, num_features, H/2^(stages-1), W/2^(stages-1))``: the last feature map."""
        return self.final(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Average pooling, dropout and (unless ``pre_logits``) the linear classifier."""
        x = self.drop(x.mean(dim=(2, 3)))  # (N, C, H, W) -> (N, C)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, num_classes)`` for float images ``(N, C, H, W)``."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh classifier with ``num_classes`` outputs (0: none, the model returns features)."""
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()


def _wide(depth: int, widen_factor: int, num_classes: int, in_chans: int, drop_rate: float,
          block_drop_rate: float) -> CifarResNet:
    if (depth - 4) % 6 or depth < 10:
        raise ValueError(f"expected a depth of 6n + 4 (10, 16, 22, 28, 40, ...), received depth={depth}")
    n = (depth - 4) // 6
    widths = (16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    return CifarResNet((n, n, n), widths, num_classes, in_chans, "B", drop_rate, stem_width=16, preact=True,
                       block_drop_rate=block_drop_rate)


def _he_cifar(n: int, num_classes: int, in_chans: int, shortcut: str, drop_rate: float) -> CifarResNet:
    return CifarResNet((n, n, n), (16, 32, 64), num_classes, in_chans, shortcut, drop_rate)


@register_model
def resnet20(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A", drop_rate: float = 0.0) -> CifarResNet:
    """He et al. CIFAR ResNet-20 (3 blocks per stage, 0.27 M parameters)."""
    return _he_cifar(3, num_classes, in_chans, shortcut, drop_rate)


@register_model
def resnet32(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A", drop_rate: float = 0.0) -> CifarResNet:
    """He et al. CIFAR ResNet-32 (5 blocks per stage, 0.46 M parameters)."""
    return _he_cifar(5, num_classes, in_chans, shortcut, drop_rate)


@register_model
def resnet44(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A", drop_rate: float = 0.0) -> CifarResNet:
    """He et al. CIFAR ResNet-44 (7 blocks per stage, 0.66 M parameters)."""
    return _he_cifar(7, num_classes, in_chans, shortcut, drop_rate)


@register_model
def resnet56(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A", drop_rate: float = 0.0) -> CifarResNet:
    """He et al. CIFAR ResNet-56 (9 blocks per stage, 0.85 M parameters)."""
    return _he_cifar(9, num_classes, in_chans, shortcut, drop_rate)


@register_model
def resnet110(num_classes: int = 10, in_chans: int = 3, shortcut: str = "A", drop_rate: float = 0.0) -> CifarResNet:
    """He et al. CIFAR ResNet-110 (18 blocks per stage, 1.7 M parameters)."""
    return _he_cifar(18, num_classes, in_chans, shortcut, drop_rate)


@register_model
def resnet18_cifar(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0) -> CifarResNet:
    """ResNet-18 for CIFAR: widths 64-512, 2 blocks per stage, 1x1-conv shortcuts (11.2 M parameters)."""
    return CifarResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, in_chans, "B", drop_rate)


@register_model
def wrn16_4(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, block_drop_rate: float = 0.0) -> CifarResNet:
    """Wide ResNet 16-4 (2 pre-activation blocks per stage, widths 64-256, 2.7 M parameters)."""
    return _wide(16, 4, num_classes, in_chans, drop_rate, block_drop_rate)


@register_model
def wrn28_10(num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0, block_drop_rate: float = 0.0) -> CifarResNet:
    """Wide ResNet 28-10 (4 pre-activation blocks per stage, widths 160-640, 36.5 M parameters)."""
    return _wide(28, 10, num_classes, in_chans, drop_rate, block_drop_rate)
