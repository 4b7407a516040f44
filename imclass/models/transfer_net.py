"""``transfer_net``: a pretrained backbone without its top, global average pooling and a new head.

The course's transfer listing (InceptionV3 without top -> GlobalAveragePooling2D -> Dense 1024 relu
-> Dense 200 relu -> Dense n softmax) as one plain ``nn.Module``::

    create("transfer_net", backbone="timm:mobilenetv2_100", num_classes=5, head="course",
           backbone_options={"pad_type": "same"})

``pool_stages=N`` also average-pools the outputs of the backbone's last N feature stages (timm's
``forward_intermediates``) and concatenates them to the final pooled features: mid-level features
(textures, parts) beside the top's, for the same forward pass. On the flowers photos with frozen
MobileNetV2 this adds about 1.5 points (bench/RESULTS.md); 0 is the course's global average pooling.

Built with random weights (model files rebuild it this way, then load their tensors);
``imclass.transfer.transfer`` builds it and loads pretrained weights into the backbone. Batch-norm
layers whose parameters are all frozen stay in eval mode in ``train()``: their running statistics
do not move while the head trains. ``batch_norm_eval = True`` keeps every backbone batch norm in
eval mode (Keras's advice for fine-tuning: normalise with the pretrained running statistics, train
scale and shift), which ``imclass.transfer.fine_tune`` sets by default.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from imclass.models._registry import create, register_model
from imclass.models.sequential import Sequential
from imclass.nn.core import Dense

HEADS = ("course", "linear")


def head_config(head: str | dict | list, in_features: int, num_classes: int) -> dict:
    """The head as a ``Sequential`` config: ``"course"`` (Dense 1024 relu, Dense 200 relu, Dense n),
    ``"linear"`` (Dense n), a list of ``imclass.layers`` (a final ``Dense(num_classes)`` is added when
    the last layer does not output ``num_classes``) or a ``Sequential.get_config()`` dict."""
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

    def __init__(self, backbone: nn.Module, head: nn.Module, num_features: int, pool_stages: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_features = num_features
        self.pool_stages = _check_pool_stages(backbone, pool_stages)
        self.num_classes = head.get_classifier().out_features if hasattr(head, "get_classifier") else None
        self.pretrained_cfg = dict(getattr(backbone, "pretrained_cfg", None) or {})
        self.batch_norm_eval = False  # True: every backbone batch norm normalises with its running statistics
        self.load_report: Any = None  # what apply_weights did to the backbone (imclass.transfer.finetune.transfer)
        self.preprocessing: Any = None  # the preprocessing those weights expect (imclass.data.preprocessing)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> pooled backbone features (N, D): the final ones, then (``pool_stages``)
        the average-pooled outputs of the last feature stages, deepest last."""
        return pooled_features(self.backbone, x, self.pool_stages)

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
        """Train/eval mode; frozen batch norm (all its parameters frozen), or every backbone batch norm
        when ``batch_norm_eval`` is set, stays in eval mode."""
        super().train(mode)
        if mode:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    params = list(m.parameters(recurse=False))
                    if self.batch_norm_eval or params and not any(p.requires_grad for p in params):
                        m.eval()
        return self


def pooled_features(backbone: nn.Module, x: torch.Tensor, pool_stages: int = 0) -> torch.Tensor:
    """The backbone's pooled pre-logit features of ``x`` (timm's contract when present), with the
    average-pooled outputs of its last ``pool_stages`` feature stages concatenated after them."""
    b = backbone
    if pool_stages:
        final, stages = b.forward_intermediates(x, indices=pool_stages)
        return torch.cat([b.forward_head(final, pre_logits=True)] + [s.mean((2, 3)) for s in stages], dim=1)
    if hasattr(b, "forward_features") and hasattr(b, "forward_head"):
        return b.forward_head(b.forward_features(x), pre_logits=True)
    return b(x).flatten(1)


class PoolStagesUnsupported(ValueError):
    """``pool_stages > 0`` asked of a backbone without timm's ``forward_intermediates``."""


def _check_pool_stages(backbone: nn.Module, pool_stages: int) -> int:
    if isinstance(pool_stages, bool) or not isinstance(pool_stages, int) or pool_stages < 0:
        raise ValueError(f"expected pool_stages an integer >= 0, received pool_stages={pool_stages!r}")
    if pool_stages and not hasattr(backbone, "forward_intermediates"):
        raise PoolStagesUnsupported(f"pool_stages={pool_stages} needs a timm backbone with forward_intermediates; "
                         f"{type(backbone).__name__} has none: use pool_stages=0")
    stages = len(getattr(backbone, "feature_info", []) or [])
    if stages and pool_stages > stages:
        raise ValueError(f"pool_stages={pool_stages} but {type(backbone).__name__} has {stages} feature stages")
    return pool_stages


def num_features(backbone: nn.Module, pool_stages: int = 0) -> int:
    """The width of ``pooled_features`` (``pool_stages`` checked first)."""
    _check_pool_stages(backbone, pool_stages)
    n = getattr(backbone, "num_features", None)
    if isinstance(n, int) and n > 0 and not pool_stages:
        return n
    with torch.no_grad():
        was = backbone.training
        backbone.eval()
        out = pooled_features(backbone, torch.zeros(1, 3, 64, 64), pool_stages)
        backbone.train(was)
    return int(out.shape[1])


@register_model
def transfer_net(backbone: str = "timm:mobilenetv2_100", num_classes: int = 10, head: str | dict | list = "course",
                 backbone_options: dict[str, Any] | None = None, pool_stages: int = 0, **kwargs: Any) -> TransferNet:
    """A registered backbone (``timm:<name>`` / ``torchvision:<name>``) without its classifier, then
    ``head``; ``pool_stages``: also pool the last N feature stages (see the module's docstring)."""
    if kwargs:
        raise ValueError(f"unexpected options for transfer_net: {sorted(kwargs)}")
    net = create(backbone, num_classes=0, **(backbone_options or {}))
    d = num_features(net, pool_stages)
    seq = Sequential.from_config(head_config(head, d, num_classes))
    return TransferNet(net, seq, d, pool_stages)
