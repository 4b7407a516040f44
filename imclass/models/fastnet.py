"""FastNet: the small ResNet-free CIFAR-10 speed-run network (after Keller Jordan's airbench).

Layout for a 32x32 input (``widths=(64, 256, 256)``, ``depth=2``)::

    whiten  conv 2x2, 3 -> 24, no padding, weights = +/- whitened patch eigenvectors   (N, 24, 31, 31)
    act
    group1  conv3x3 -> maxpool2 -> BN -> act -> conv3x3 -> BN -> act                  (N, 64, 15, 15)
    group2  same                                                                        (N, 256, 7, 7)
    group3  same                                                                        (N, 256, 3, 3)
    pool    global max pool -> flatten                                                  (N, 256)
    head    linear, no bias, logits scaled by ``logit_scale`` (1/9)                     (N, 10)

Ingredients that make it train in a few epochs: the first convolution is a fixed
whitening filter bank computed from the data (``init_whitening``); batch norms have a frozen
unit weight (only the shift is learned) and a high running-stat momentum; convolutions start
as identities (dirac) on their first input channels.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from imclass.models._registry import register_model

__all__ = ["FastNet", "fastnet", "init_whitening", "patch_covariance", "BatchNormNoWeight"]

_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


def _make_act(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"expected act in {sorted(_ACTIVATIONS)}, received act={name!r}")
    return _ACTIVATIONS[name]()


class BatchNormNoWeight(nn.BatchNorm2d):
    """Batch norm whose scale is frozen at 1: only the shift (bias) is learned.

    ``momentum`` is torch's convention (weight of the new batch statistic); 0.4 keeps the
    running statistics close to the fast-changing weights of a few-epoch run.
    """

    def __init__(self, num_features: int, momentum: float = 0.4, eps: float = 1e-12):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.weight.requires_grad_(False)


class DiracConv2d(nn.Conv2d):
    """3x3 'same' convolution without bias, initialised as identity on its first in-channels."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=3, padding="same", bias=False)
        with torch.no_grad():
            w = self.weight
            nn.init.dirac_(w[: min(in_channels, out_channels)])


class ConvGroup(nn.Module):
    """conv -> maxpool2 -> BN -> act, then (depth - 1) x (conv -> BN -> act): halves the resolution."""

    def __init__(self, in_channels: int, out_channels: int, depth: int = 2, act: str = "gelu", bn_momentum: float = 0.4):
        super().__init__()
        layers: list[nn.Module] = [DiracConv2d(in_channels, out_channels), nn.MaxPool2d(2)]
        layers += [BatchNormNoWeight(out_channels, bn_momentum), _make_act(act)]
        for _ in range(depth - 1):
            layers += [DiracConv2d(out_channels, out_channels), BatchNormNoWeight(out_channels, bn_momentum), _make_act(act)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class FastNet(nn.Module):
    """Whitening conv + three conv groups + global max pool + scaled linear head (see module doc)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        widths: Sequence[int] = (64, 256, 256),
        depth: int = 2,
        whiten_kernel: int = 2,
        act: str = "gelu",
        bn_momentum: float = 0.4,
        logit_scale: float = 1 / 9,
    ):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"expected three positive widths, received widths={widths}")
        if depth < 1:
            raise ValueError(f"expected depth >= 1 (convolutions per group), received depth={depth}")
        if whiten_kernel < 1:
            raise ValueError(f"expected whiten_kernel >= 1, received whiten_kernel={whiten_kernel}")
        self.num_classes = num_classes
        self.num_features = widths[-1]
        self.logit_scale = logit_scale
        self.final_activation = "softmax"
        whiten_width = 2 * in_chans * whiten_kernel**2  # +/- each eigenvector of the patch covariance
        self.whiten = nn.Conv2d(in_chans, whiten_width, kernel_size=whiten_kernel, padding=0, bias=True)
        self.whiten.weight.requires_grad_(False)  # set from the data by init_whitening, never trained
        self.act = _make_act(act)
        chans = (whiten_width,) + widths
        self.groups = nn.Sequential(
            *[ConvGroup(chans[i], chans[i + 1], depth, act, bn_momentum) for i in range(3)]
        )
        self.head = nn.Linear(widths[-1], num_classes, bias=False) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images -> (N, widths[-1], h, w) feature map before pooling."""
        return self.groups(self.act(self.whiten(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global max pool, then the scaled linear classifier (skipped when ``pre_logits``)."""
        # (N, C, h, w) -> (N, C). Not torch.amax: its gradient is split over the tied maxima, and
        # torch.compile's bf16 kernels find none (0/0 = NaN in every weight below the head).
        x = x.flatten(2).max(dim=2).values
        return x if pre_logits else self.head(x) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head by a fresh one with ``num_classes`` outputs (0 = features only)."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes, bias=False) if num_classes > 0 else nn.Identity()


@register_model
def fastnet(
    num_classes: int = 10,
    in_chans: int = 3,
    widths: Sequence[int] = (64, 256, 256),
    depth: int = 2,
    act: str = "gelu",
    **kw,
) -> FastNet:
    """airbench-style CIFAR-10 speed network; ``widths`` (3 groups) and ``depth`` (convs per group)."""
    return FastNet(num_classes=num_classes, in_chans=in_chans, widths=widths, depth=depth, act=act, **kw)


def patch_covariance(images: torch.Tensor, kernel: int) -> torch.Tensor:
    """Second-moment matrix (D, D) of all ``kernel x kernel`` patches, D = C * kernel**2.

    ``images`` are float (N, C, H, W), normalised as the network sees them. Flattening order
    matches a conv weight ``(out, C, k, k)`` reshaped to ``(out, D)``.
    """
    if images.ndim != 4:
        raise ValueError(f"expected float images (N, C, H, W), received shape {tuple(images.shape)}")
    n, c = images.shape[:2]
    patches = images.double().unfold(2, kernel, 1).unfold(3, kernel, 1)  # (N, C, H', W', k, k)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kernel * kernel)  # (N*H'*W', D)
    return patches.T @ patches / len(patches)


@torch.no_grad()
def init_whitening(model: FastNet, images: torch.Tensor, eps: float = 5e-4) -> torch.Tensor:
    """Set the whitening conv to +/- the patch covariance eigenvectors scaled by 1/sqrt(eigval + eps).

    After this, the first D output channels of the conv have (almost) identity covariance on
    the data: every direction of pixel-patch space starts with the same scale, which is what
    lets a few epochs of SGD go far. Returns the eigenvalues (largest first).
    """
    conv = model.whiten
    k = conv.kernel_size[0]
    cov = patch_covariance(images, k)
    eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending
    eigvals, eigvecs = eigvals.flip(0), eigvecs.flip(1)
    filters = (eigvecs.T / torch.sqrt(eigvals.clamp_min(0) + eps)[:, None])  # (D, D): one filter per row
    filters = filters.reshape(-1, *conv.weight.shape[1:]).to(conv.weight.dtype)  # (D, C, k, k)
    if 2 * len(filters) != conv.out_channels:
        raise ValueError(f"expected a whitening conv with {2 * len(filters)} outputs, received {conv.out_channels}")
    conv.weight.copy_(torch.cat([filters, -filters]))
    return eigvals.float()
