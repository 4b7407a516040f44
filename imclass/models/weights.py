"""Pretrained weights: find them, read them in the formats users have, load them strictly, say what happened.

    model = imclass.models.create("timm:mobilenetv2_100", num_classes=5, pad_type="same")
    report = apply_weights(model, "mobilenetv2_100", "imagenet")     # the known file under the weights root
    report = apply_weights(model, "mobilenetv2_100", "my_finetune.pth")
    print(report)            # loaded / dropped head / missing / unexpected / shape-mismatched keys
    pre = report.preprocessing                                        # what these weights expect as input

``weights``: ``None`` keeps the model's initialisation; ``"imagenet"`` is the known file for ``arch``
under the weights root (``weights_dir=`` / ``--weights-dir``, else ``$IMCLASS_WEIGHTS``, else
``~/.cache/imclass/weights``), else timm's repository on the Hugging Face hub (``$HF_ENDPOINT``, default
huggingface.co), downloaded once through ``imclass.data.download`` with the SHA-256 the hub announces
checked, and cached under ``$IMCLASS_CACHE/hub``; offline and not cached, a ``WeightsError`` in seconds
says what to fetch and how to pass a file instead. The model options a set of weights needs (the
converted MobileNetV2 file's TF "same" padding) follow the weights actually loaded (``weights_options``):
the hub's PyTorch-trained MobileNetV2 gets timm's ordinary padding. A path is a
``.safetensors`` file or a ``.pth``/``.pt``/``.bin`` state dict (read with ``weights_only=True``), possibly
wrapped in a checkpoint's ``state_dict`` / ``model`` key, in any float dtype. The old classifier is
dropped when its class count differs from the model's (the transfer-learning start); every other key
must match (``strict=True``) or the error lists the missing, unexpected and shape-mismatched keys.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from imclass.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from imclass.models._registry import create
from imclass.models.weight_files import (  # several re-exported: imclass.models.weights was their home
    DEFAULT_ROOT,
    ENV_VAR,
    HUB_CACHE,
    HUB_ENDPOINT,
    KNOWN_WEIGHTS,
    TORCH_SUFFIXES,
    KnownWeights,
    WeightsError,
    backbone_name,
    bare_arch,
    find_known_weights,
    hub_file,
    hub_state,
    imagenet_classes,
    is_known_file,
    online as _online,  # tests probe the network through this module
    read_state_dict,
    resolve_weights_root,
    sha256_of,
    weights_options,
)

# Deferred imports (inside functions), for start-up time: safetensors, timm
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = [
    "ENV_VAR",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "KNOWN_WEIGHTS",
    "KnownWeights",
    "LoadReport",
    "Preprocessing",
    "WeightsError",
    "apply_weights",
    "backbone_name",
    "create_backbone",
    "hub_file",
    "find_known_weights",
    "imagenet_classes",
    "preprocessing_for",
    "read_state_dict",
    "resolve_weights_root",
    "weights_options",
]


@dataclass
class LoadReport:
    """What ``apply_weights`` did: where the weights came from and which keys were loaded or not."""

    arch: str
    source: str | None  # a file path, "hub:<id>", or None (initialisation kept)
    loaded: list[str] = field(default_factory=list)
    dropped_head: list[str] = field(default_factory=list)  # the old classifier, left at its fresh init
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: model (a, b) vs file (c, d)"
    preprocessing: Preprocessing | None = None
    sha256: str | None = None

    @property
    def ok(self) -> bool:
        """True when every key of the model (but a dropped head) came from the weights."""
        return not (self.missing or self.unexpected or self.mismatched)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (key lists shortened to counts plus the first few)."""
        out: dict[str, Any] = {"arch": self.arch, "source": self.source, "sha256": self.sha256,
                               "loaded": len(self.loaded)}
        for name in ("dropped_head", "missing", "unexpected", "mismatched"):
            out[name] = list(getattr(self, name))
        out["preprocessing"] = self.preprocessing.to_dict() if self.preprocessing else None
        return out

    def __str__(self) -> str:
        if self.source is None:
            return f"{self.arch}: no weights loaded (initialisation kept)"
        parts = [f"{self.arch}: {len(self.loaded)} tensors loaded from {self.source}"]
        if self.dropped_head:
            parts.append(f"classifier dropped (class count differs): {_few(self.dropped_head)}")
        for name in ("missing", "unexpected", "mismatched"):
            keys = getattr(self, name)
            if keys:
                parts.append(f"{name}: {_few(keys)}")
        return "; ".join(parts)


def _timm_preprocessing(arch: str) -> Preprocessing | None:
    import timm

    if not timm.is_model(arch):
        return None
    try:
        cfg = timm.get_pretrained_cfg(arch)
    except Exception:  # some names have no default config
        cfg = None
    if cfg is None:
        return None
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    size = tuple(int(v) for v in cfg.get("input_size", (3, 224, 224)))
    crop = size[-1]
    resize = int(round(crop / float(cfg.get("crop_pct") or 0.875)))
    interp = cfg.get("interpolation") or "bilinear"
    return Preprocessing(
        input_size=size, resize=max(resize, crop), crop=crop,
        interpolation=interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
        mean=tuple(float(v) for v in cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", IMAGENET_STD)),
    )


def preprocessing_for(arch: str, weights: str | os.PathLike | None = "imagenet",
                      *, weights_dir: str | os.PathLike | None = None) -> Preprocessing:
    """The preprocessing that ``weights`` for ``arch`` expect.

    Known weights (``"imagenet"`` or the known file itself) carry their own (e.g. mean = std = 0.5 for
    the TF-converted MobileNetV2); an imclass model file carries what it was trained with; anything
    else gets timm's pretrained config for ``arch``, else ImageNet's resize 256 / crop 224 / mean / std.
    """
    bare = bare_arch(arch)
    known = KNOWN_WEIGHTS.get(bare)
    if weights is not None and str(weights) != "imagenet":
        path = Path(weights)
        recorded = _recorded_preprocessing(path)
        if recorded is not None:
            return recorded
        if known is not None and is_known_file(bare, path, weights_dir):
            return known.preprocessing
    elif known is not None and (weights is None or find_known_weights(bare, weights_dir) is not None):
        return known.preprocessing
    return _timm_preprocessing(bare) or Preprocessing()


def _recorded_preprocessing(path: Path) -> Preprocessing | None:
    """The preprocessing an imclass model file records, when it records a complete one."""
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("imclass")
        pre = json.loads(meta).get("preprocessing") if meta else None
        if pre and pre.get("mean") and pre.get("std") and pre.get("input_size"):
            return Preprocessing.from_dict(pre)
    except Exception:
        return None
    return None


def _head_names(model: nn.Module) -> list[str]:
    """Dotted names of the model's classifier module(s): timm's ``pretrained_cfg["classifier"]``, the
    module ``get_classifier()`` returns, else the last module holding parameters."""
    names: list[str] = []
    cfg = getattr(model, "pretrained_cfg", None) or {}
    declared = cfg.get("classifier") if isinstance(cfg, dict) else None
    if isinstance(declared, str):
        names.append(declared)
    elif isinstance(declared, (tuple, list)):
        names.extend(declared)
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for name, module in model.named_modules():
            if module is head and name:
                names.append(name)
                break
    if not names:
        with_params = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
        if with_params:
            names.append(with_params[-1])
    return sorted(set(names))


def _under(key: str, prefixes: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def apply_weights(
    model: nn.Module,
    arch: str,
    weights: str | os.PathLike | None,
    *,
    weights_dir: str | os.PathLike | None = None,
    strict: bool = True,
) -> LoadReport:
    """Load ``weights`` into ``model`` (architecture ``arch``) and report what was loaded.

    ``None`` keeps the initialisation; ``"imagenet"`` = the known file under the weights root, else
    timm's hub when online; else a path. The old classifier is dropped when its shape differs from
    the model's (or the model has none); with ``strict`` any other missing, unexpected or
    shape-mismatched key raises ``WeightsError`` listing them and the model is left untouched.
    With ``strict=False`` the matching tensors are loaded and the rest reported.
    """
    if weights is None:
        return LoadReport(arch=arch, source=None, preprocessing=preprocessing_for(arch, None, weights_dir=weights_dir))
    sha = None
    if str(weights) == "imagenet":
        local = find_known_weights(arch, weights_dir)
        if local is not None:
            state, source, sha = read_state_dict(local), str(local), sha256_of(local)
        else:
            state, source, sha = hub_state(arch, weights_dir)
    else:
        path = Path(weights).expanduser()
        state, source, sha = read_state_dict(path), str(path), sha256_of(path)

    own = model.state_dict()
    heads = _head_names(model)
    report = LoadReport(arch=arch, source=source, sha256=sha,
                        preprocessing=preprocessing_for(arch, weights, weights_dir=weights_dir))
    to_load: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        target = own.get(key)
        if _under(key, heads) and (target is None or target.shape != tensor.shape):
            report.dropped_head.append(key)
        elif target is None:
            report.unexpected.append(key)
        elif target.shape != tensor.shape:
            report.mismatched.append(f"{key}: model {tuple(target.shape)} vs file {tuple(tensor.shape)}")
        else:
            to_load[key] = tensor.to(target.dtype) if tensor.is_floating_point() else tensor
    # the model's own classifier stays at its fresh initialisation when the file's was dropped or absent
    report.missing = [k for k in own if k not in state and not _under(k, heads)]
    report.loaded = sorted(to_load)
    if strict and not report.ok:
        raise WeightsError(f"{source}: the weights do not match {arch} ({_problems(report)}); nothing was loaded "
                           "(strict=False loads the matching tensors only)")
    if not to_load:
        raise WeightsError(f"{source}: no tensor in the file matches {arch} by name and shape ({_problems(report)})")
    model.load_state_dict(to_load, strict=False)
    return report


def _problems(report: LoadReport) -> str:
    parts = []
    for name, label in (("missing", "missing from the file"), ("unexpected", "not in the model"),
                        ("mismatched", "shape mismatch")):
        keys = getattr(report, name)
        if keys:
            parts.append(f"{label}: {_few(keys)}")
    return "; ".join(parts) or "nothing to load"


def create_backbone(
    arch: str,
    num_classes: int = 0,
    weights: str | os.PathLike | None = "imagenet",
    *,
    weights_dir: str | os.PathLike | None = None,
    strict: bool = True,
    **options: Any,
) -> tuple[nn.Module, LoadReport]:
    """Build backbone ``arch`` (timm or torchvision, by name) with ``num_classes`` outputs (0: pooled
    features) and the options the weights to be loaded need (``weights_options``), then ``apply_weights``."""
    name = backbone_name(arch)
    options = {**weights_options(arch, weights, weights_dir), **options}
    model = create(name, num_classes=num_classes, **options)
    report = apply_weights(model, bare_arch(arch), weights, weights_dir=weights_dir, strict=strict)
    return model, report


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")
