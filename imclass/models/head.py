"""timm's classifier contract for the Keras-style models (``Sequential`` and functional ``Model``), once.

Every imclass model keeps timm's methods: ``forward_features``, ``forward_head(x, pre_logits=False)``,
``get_classifier()``, ``reset_classifier(num_classes)`` and ``num_classes``. For a model built from
course layers the classifier is a ``Dense`` layer near the end; ``Sequential`` and ``Model`` differ
only in how they find it, run what comes before it and swap it, which they say through three small
methods (``classifier_head``, ``run_body``, ``replace_classifier``). The contract itself is here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from imclass.nn.core import Dense
from imclass.nn.shapes import check_int

__all__ = ["ClassifierHead", "HeadContract"]


@dataclass
class ClassifierHead:
    """Where a Keras-style model's classifier is: its ``Dense`` layer, the module-name prefix it is
    registered under, and the modules that make up the head (the ``Linear`` first, then what follows
    it, less a final softmax / sigmoid: the model returns logits)."""

    layer: Dense
    name: str
    modules: list[nn.Module]

    @property
    def linear(self) -> nn.Module:
        """The classifier's ``nn.Linear`` (what ``get_classifier`` returns)."""
        return self.modules[0]


class HeadContract:
    """timm's classifier contract on top of ``classifier_head`` / ``run_body`` / ``replace_classifier``,
    which the model class provides (a base of ``Sequential`` and ``Model``)."""

    def classifier_head(self) -> ClassifierHead | None:
        """The model's classifier, or None when it has no ``Dense`` to use as one."""
        raise NotImplementedError

    def run_body(self, x: torch.Tensor) -> torch.Tensor:
        """Check ``x`` against the input shape and run everything before the classifier."""
        raise NotImplementedError

    def replace_classifier(self, dense: Dense, head: ClassifierHead) -> None:
        """Put ``dense`` (same name, new width) where ``head`` is."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the classifier: the features it sees (the output when there is no classifier)."""
        return self.run_body(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The classifier (its ``Dense`` and what follows, less a final softmax); ``pre_logits`` skips it."""
        head = self.classifier_head()
        if pre_logits or head is None:
            return x
        for module in head.modules:
            x = module(x)
        return x

    def get_classifier(self) -> nn.Module:
        """The classifier's linear module (``nn.Identity()`` when the model has none)."""
        head = self.classifier_head()
        return nn.Identity() if head is None else head.linear

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a fresh ``Dense`` with ``num_classes`` outputs (same activation and
        name; the body's weights are kept)."""
        num_classes = check_int("num_classes", num_classes)
        head = self.classifier_head()
        if head is None:
            raise ValueError(f"this {type(self).__name__} has no Dense layer to use as its classifier")
        config = {**head.layer.get_config(), "units": num_classes, "name": head.name}
        config.pop("input_shape", None)
        self.replace_classifier(Dense(**config), head)

    @property
    def num_classes(self) -> int | None:
        """Outputs of the classifier (its ``Dense``'s units), or None when the model has no classifier."""
        head = self.classifier_head()
        return None if head is None else head.layer.units
