"""``transfer_net``: a pretrained backbone without its top, global average pooling and a new head.

The course's transfer listing (InceptionV3 without top -> GlobalAveragePooling2D -> Dense 1024 relu
-> Dense 200 relu -> Dense n softmax) as one plain ``nn.Module``::

    create("transfer_net", backbone="timm:mobilenetv2_100", num_classes=5, head="course",
           backbone_options={"pad_type": "same"})

Built with random weights (model files rebuild it this way, then load their tensors);
``imclass.transfer.transfer`` builds it and loads pretrained weights into the backbone. Batch-norm
layers whose parameters are all frozen stay in eval mode in ``train()``: their running statistics
do not move while the head trains.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from imclass.models._registry import create, register_model

HEADS = ("course", "linear")


def head_config(head: str | dict | list, in_features: int, num_classes: int) -> dict:
    """The head as a ``Sequential`` config: ``"course"`` (Dense 1024 relu, Dense 200 relu, Dense n),
    ``"linear"`` (Dense n), a list of ``imclass.layers`` (a final ``Dense(num_classes)`` is added when
    the last layer does not output ``num_classes``) or a ``Sequential.get_config()`` dict."""
    from imclass.layers import Dense, Sequential

    if isinstance(head, dict):
        return head
    if head == "course":
        layers = [Dense(1024, activation="relu"), Dense(200, activation="relu"), Dense(num_classes)]
    elif head == "linear":
        layers = [Dense(num_classes)]
    elif isinstance(head, (list, tuple)):
        layers = list(head)
        if not layers:
            raise ValueError("expected head layers, received an empty list")
    else:
        raise ValueError(f"expected head 'course', 'linear' or a list of imclass.layers, received head={head!r}")
    seq = Sequential(layers, input_shape=in_features)
    if seq.output_shape != (num_classes,):
        seq.add(Dense(num_classes))
    return seq.get_config()


class TransferNet(nn.Module):
    """``backbone`` (pooled features, timm's ``forward_head(pre_logits=True)``) -> ``head`` (logits)."""

    final_activation = "softmax"

    def __init__(self, backbone: nn.Module, head: nn.Module, num_features: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_features = num_features
        self.num_classes = head.get_classifier().out_features if hasattr(head, "get_classifier") else None
        self.pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> pooled backbone features (N, D)."""
        b = self.backbone
        if hasattr(b, "forward_features") and hasattr(b, "forward_head"):
            return b.forward_head(b.forward_features(x), pre_logits=True)
        return b(x).flatten(1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features -> logits (``pre_logits``: the features unchanged)."""
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, num_classes) for a normalised float batch."""
        return self.head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        """The last layer of the head."""
        return self.head.get_classifier()

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh last layer with ``num_classes`` outputs."""
        self.head.reset_classifier(num_classes)
        self.num_classes = num_classes

    def train(self, mode: bool = True) -> "TransferNet":
        """Train/eval mode; frozen batch norm (all its parameters frozen) always stays in eval mode."""
        super().train(mode)
        if mode:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    params = list(m.parameters(recurse=False))
                    if params and not any(p.requires_grad for p in params):
                        m.eval()
        return self


def _num_features(backbone: nn.Module) -> int:
    n = getattr(backbone, "num_features", None)
    if isinstance(n, int) and n > 0:
        return n
    with torch.no_grad():
        was = backbone.training
        backbone.eval()
        x = torch.zeros(1, 3, 64, 64)
        out = backbone.forward_head(backbone.forward_features(x), pre_logits=True) \
            if hasattr(backbone, "forward_head") else backbone(x).flatten(1)
        backbone.train(was)
    return int(out.shape[1])


@register_model
def transfer_net(backbone: str = "timm:mobilenetv2_100", num_classes: int = 10, head: str | dict | list = "course",
                 backbone_options: dict[str, Any] | None = None, **kwargs: Any) -> TransferNet:
    """A registered backbone (``timm:<name>`` / ``torchvision:<name>``) without its classifier, then ``head``."""
    from imclass.layers import Sequential

    if kwargs:
        raise ValueError(f"unexpected options for transfer_net: {sorted(kwargs)}")
    net = create(backbone, num_classes=0, **(backbone_options or {}))
    d = _num_features(net)
    seq = Sequential.from_config(head_config(head, d, num_classes))
    return TransferNet(net, seq, d)
