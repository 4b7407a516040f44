"""Every timm architecture as ``timm:<name>``: ``create("timm:resnet18", num_classes=10)``.

Models are built with ``pretrained=False``: weights cannot be downloaded here. To start from
pretrained weights saved locally (a timm/Hugging Face ``.safetensors``, ``.pth`` or ``.bin`` file):

* ``pretrained_file="weights.safetensors"``: timm's pretrained loading from a file; the backbone
  is loaded, the first convolution adapted to ``in_chans`` and the classifier left fresh when
  ``num_classes`` differs from the file's (the usual transfer-learning start);
* ``checkpoint_path="model.pth"``: a complete state dict of exactly this architecture, loaded as is.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch.nn as nn

from imclass.models._registry import register_prefix


def create_timm(name: str, num_classes: int = 10, in_chans: int = 3, pretrained: bool = False,
                pretrained_file: str | Path | None = None, checkpoint_path: str | Path | None = None,
                **kwargs: Any) -> nn.Module:
    """Build ``timm.create_model(name, ...)`` with weights from nothing or from a local file."""
    import timm  # imported here: timm is slow to import and most commands never need it

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f" Did you mean one of {close}?" if close else " List them with `imclass models --pattern 'timm:*'`."
        raise ValueError(f"unknown timm model {name!r}.{hint}")
    for label, path in (("pretrained_file", pretrained_file), ("checkpoint_path", checkpoint_path)):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{label}: no such weights file {str(path)!r}")
    if pretrained and pretrained_file is None:
        raise ValueError(
            f"pretrained weights for timm:{name} cannot be downloaded here; save them locally and pass "
            f"pretrained_file='path/to/{name}.safetensors' (backbone weights, fresh classifier) or "
            "checkpoint_path='path/to/model.pth' (a full state dict of this exact architecture)"
        )
    options: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_chans, **kwargs}
    if pretrained_file is not None:
        options.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_file)})
    if checkpoint_path is not None:
        options["checkpoint_path"] = str(checkpoint_path)
    return timm.create_model(name, **options)


register_prefix("timm", create_timm)
