"""Grad-CAM for the web page's overlay, through ``imclass.explain`` (Captum) when that package part exists.

The service only adapts: it never computes attributions itself. A model without convolutional
features (a k-NN, an MLP, an ONNX file) answers ``ExplainUnavailable`` (HTTP 501).
"""
from __future__ import annotations

import base64
import importlib
import io
from typing import Any

import torch

__all__ = ["ExplainUnavailable", "explain_available", "gradcam_overlay"]


class ExplainUnavailable(RuntimeError):
    """No Grad-CAM for this model or in this installation (the message says why)."""


def _gradcam_fn() -> Any:
    try:
        module = importlib.import_module("imclass.explain")
    except ImportError:
        return None
    for name in ("gradcam", "grad_cam", "GradCAM"):
        fn = getattr(module, name, None)
        if fn is not None:
            return fn
    return None


def explain_available() -> bool:
    """Whether ``imclass.explain`` provides Grad-CAM in this installation."""
    return _gradcam_fn() is not None


def gradcam_overlay(predictor: Any, image: torch.Tensor, target: int | None = None) -> dict:
    """Grad-CAM heat map of ``image`` (uint8 (C, H, W)) for ``target`` (default: the top class), blended
    over the image: ``{"class", "index", "overlay": "data:image/png;base64,..."}``."""
    fn = _gradcam_fn()
    if fn is None:
        raise ExplainUnavailable("Grad-CAM is not available: this installation has no imclass.explain")
    if predictor.kind not in ("classifier", "model"):
        raise ExplainUnavailable(f"Grad-CAM needs a neural network; model {predictor.name!r} is a {predictor.kind}")
    clf = predictor.backend
    if target is None:
        target = int(predictor.predict_proba(image.unsqueeze(0))[0].argmax())
    if not 0 <= target < len(predictor.classes):
        raise ExplainUnavailable(f"expected target in 0..{len(predictor.classes) - 1}, received {target}")
    with predictor._lock:
        heat = fn(clf, image.unsqueeze(0), target=target)
    heat = torch.as_tensor(getattr(heat, "heatmap", heat)).float().reshape(-1, *heat.shape[-2:])[0]
    return {"class": predictor.classes[target], "index": target, "overlay": _overlay_png(image, heat)}


def _overlay_png(image: torch.Tensor, heat: torch.Tensor) -> str:
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image

    h, w = image.shape[-2:]
    heat = torch.nn.functional.interpolate(heat[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    heat = (heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-8)
    colour = colormaps["jet"](heat.numpy())[..., :3]
    base = image.expand(3, -1, -1).permute(1, 2, 0).numpy() / 255.0
    blended = (0.55 * base + 0.45 * colour).clip(0, 1)
    buf = io.BytesIO()
    Image.fromarray((blended * 255).astype(np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
