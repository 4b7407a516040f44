"""NASNet-A Mobile (4 @ 1056, Zoph et al. 2018), built from timm's NASNet cells.

timm ships NASNet-A Large (6 @ 4032) only; the mobile network is the same cells with 4 per stage,
a 32-filter stem and 1056 penultimate filters (Keras's ``NASNetMobile``).
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, create_classifier
from timm.models.nasnet import CellStem0, CellStem1, FirstCell, NormalCell, ReductionCell0, ReductionCell1

__all__ = ["NASNetAMobile"]


class NASNetAMobile(nn.Module):
    """NASNet-A with ``num_blocks`` cells per stage: stem, 3 stages separated by 2 reduction cells,
    ReLU; timm's contract (``forward_features``, ``forward_head``, ``get_classifier``, ``reset_classifier``)."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3, stem_size: int = 32, num_features: int = 1056,
                 num_blocks: int = 4, channel_multiplier: int = 2, drop_rate: float = 0.0, global_pool: str = "avg",
                 pad_type: str = "same") -> None:
        super().__init__()
        self.num_classes, self.num_features, self.drop_rate = num_classes, num_features, drop_rate
        c = num_features // 24
        self.conv0 = ConvNormAct(in_chans, stem_size, kernel_size=3, padding=0, stride=2,
                                 norm_layer=partial(nn.BatchNorm2d, eps=0.001, momentum=0.1), apply_act=False)
        self.cell_stem_0 = CellStem0(stem_size, num_channels=c // channel_multiplier ** 2, pad_type=pad_type)
        self.cell_stem_1 = CellStem1(stem_size, num_channels=c // channel_multiplier, pad_type=pad_type)
        cells: list[nn.Module] = []
        # per stage s (channels c * 2**s): a FirstCell, then NormalCells; reduction cells between stages
        widths = [(c, 2 * c), (6 * c, 8 * c), (12 * c, 16 * c)]  # (left input, right input) of each FirstCell
        self.reductions = nn.ModuleList()
        for s, (in_left, in_right) in enumerate(widths):
            w = c * 2 ** s
            cells.append(FirstCell(in_chs_left=in_left, out_chs_left=w // 2, in_chs_right=in_right, out_chs_right=w,
                                   pad_type=pad_type))
            for i in range(1, num_blocks):
                left = in_right if i == 1 else 6 * w
                cells.append(NormalCell(in_chs_left=left, out_chs_left=w, in_chs_right=6 * w, out_chs_right=w,
                                        pad_type=pad_type))
            if s < 2:
                red = (ReductionCell0, ReductionCell1)[s]
                self.reductions.append(red(in_chs_left=6 * w, out_chs_left=2 * w, in_chs_right=6 * w,
                                           out_chs_right=2 * w, pad_type=pad_type))
        self.cells = nn.ModuleList(cells)
        self.num_blocks = num_blocks
        self.act = nn.ReLU()
        self.global_pool, self.last_linear = create_classifier(num_features, num_classes, pool_type=global_pool)
        self.head_drop = nn.Dropout(drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and cells: (N, C, H, W) -> (N, num_features, H/32, W/32)."""
        x_conv0 = self.conv0(x)
        x_stem_0 = self.cell_stem_0(x_conv0)
        x, prev = self.cell_stem_1(x_conv0, x_stem_0), x_stem_0
        for s in range(3):
            for i in range(self.num_blocks):
                x, prev = self.cells[s * self.num_blocks + i](x, prev), x
            if s < 2:
                x, prev = self.reductions[s](x, prev), prev  # the next FirstCell also sees the cell before the last
        return self.act(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pooling, dropout, classifier."""
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.last_linear(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) (pooled features when ``num_classes=0``)."""
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The final linear layer."""
        return self.last_linear

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """A fresh classifier of ``num_classes`` outputs (0: none)."""
        self.num_classes = num_classes
        self.global_pool, self.last_linear = create_classifier(self.num_features, num_classes, pool_type=global_pool)
