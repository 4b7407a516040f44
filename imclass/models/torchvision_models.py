"""torchvision's classic architectures as ``torchvision:<name>`` with timm's model contract.

``create("torchvision:squeezenet1_1", num_classes=5)`` builds torchvision's own module (its state
dict keys are torchvision's, so torchvision checkpoints load as they are) and adds
``forward_features``, ``forward_head(x, pre_logits=False)``, ``get_classifier()`` and
``reset_classifier(n)`` so that transfer learning treats it like any timm model. Weights are never
downloaded here: load them with ``imclass.models.weights.apply_weights``.
"""
from __future__ import annotations

import difflib
from typing import Any

import torch
import torch.nn as nn

from imclass.models._registry import register_prefix

# Deferred imports (inside functions), for start-up time: torchvision
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

# family prefix -> dotted path of the module whose last layer is the classifier
_HEADS = {
    "squeezenet": "classifier",
    "resnet": "fc",
    "resnext": "fc",
    "wide_resnet": "fc",
    "alexnet": "classifier",
    "vgg": "classifier",
    "densenet": "classifier",
    "mobilenet": "classifier",
    "efficientnet": "classifier",
}


def _family(name: str) -> str:
    for prefix in sorted(_HEADS, key=len, reverse=True):
        if name.startswith(prefix):
            return prefix
    raise ValueError(
        f"torchvision:{name}: supported families are {sorted(_HEADS)} (use timm:<name> for anything else)"
    )


class _TimmContract:
    """timm's contract on top of a torchvision classifier (mixed into its own class; keys unchanged)."""

    tv_family: str = ""
    num_classes: int = 0  # outputs of the classifier now (timm's attribute)
    pretrained_cfg: dict[str, Any] = {}  # timm's description of the expected input

    @classmethod
    def adopt(cls, base: nn.Module, name: str, num_classes: int) -> nn.Module:
        """Give a torchvision classifier this contract in place (same module and state-dict keys; only
        methods are added): ``base`` becomes an instance of a subclass of its own class and ``cls``."""
        base.__class__ = type(type(base).__name__, (cls, type(base)), {"tv_family": _family(name)})
        base.init_contract(name, num_classes)
        return base

    def init_contract(self, name: str, num_classes: int) -> None:
        """Set the contract's attributes (called once, by ``adopt``)."""
        self.num_classes = num_classes
        self.pretrained_cfg = {"input_size": (3, 224, 224), "architecture": name}
        if num_classes == 0:
            self.reset_classifier(0)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> the last feature map (N, C, h, w)."""
        if self.tv_family in ("resnet", "resnext", "wide_resnet"):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            return self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.features(x)
        return torch.relu(x) if self.tv_family == "densenet" else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Feature map -> pooled features (``pre_logits``) or logits."""
        if self.tv_family == "squeezenet":
            if pre_logits:
                return x.mean((2, 3))  # (N, 512, h, w) -> (N, 512)
            return torch.flatten(self.classifier(x), 1)
        if self.tv_family in ("alexnet", "vgg"):
            x = torch.flatten(self.avgpool(x), 1)
            return self.classifier[:-1](x) if pre_logits else self.classifier(x)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        if pre_logits:
            head = self._head_module()
            return head[:-1](x) if isinstance(head, nn.Sequential) else x
        return self._head_module()(x)

    def _head_module(self) -> nn.Module:
        return getattr(self, _HEADS[self.tv_family])

    def get_classifier(self) -> nn.Module:
        """The last (classifying) layer."""
        head = self._head_module()
        if isinstance(head, nn.Sequential):
            index = 1 if self.tv_family == "squeezenet" else len(head) - 1
            return head[index]
        return head

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh last layer with ``num_classes`` outputs (0: the pooled features are the output)."""
        old = self.get_classifier()
        if isinstance(old, nn.Conv2d):
            new = nn.Conv2d(old.in_channels, num_classes, 1) if num_classes else nn.Identity()
        else:
            new = nn.Linear(old.in_features, num_classes) if num_classes else nn.Identity()
        head = self._head_module()
        if isinstance(head, nn.Sequential):
            head[1 if self.tv_family == "squeezenet" else len(head) - 1] = new
        else:
            setattr(self, _HEADS[self.tv_family], new)
        self.num_classes = num_classes


def create_torchvision(name: str, num_classes: int = 1000, **kwargs: Any) -> nn.Module:
    """Build ``torchvision.models.<name>(weights=None, num_classes=...)`` with timm's contract added."""
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=5)
        raise ValueError(f"unknown torchvision model {name!r}." + (f" Did you mean one of {close}?" if close else ""))
    _family(name)  # an unsupported family fails before the model is built
    if kwargs.get("weights") is not None:
        raise ValueError("torchvision weights cannot be downloaded here; use apply_weights(model, arch, PATH)")
    kwargs.pop("weights", None)
    base = torchvision.models.get_model(name, weights=None, num_classes=max(num_classes, 1), **kwargs)
    return _TimmContract.adopt(base, name, num_classes)


register_prefix("torchvision", create_torchvision)
