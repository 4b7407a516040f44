"""Grad-CAM for the web page's overlay, through ``imclass.explain`` (Captum) when that package part exists.

The service only adapts: it never computes attributions itself. A model without convolutional
features (a k-NN, an MLP, an ONNX file) answers ``ExplainUnavailable`` (HTTP 501).
"""
from __future__ import annotations

import base64
import importlib
import io
from typing import Any

import numpy as np
import torch

# Deferred imports (inside functions), for start-up time: PIL, matplotlib
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["ExplainUnavailable", "explain_available", "gradcam_overlay"]


class ExplainUnavailable(RuntimeError):
    """No Grad-CAM for this model or in this installation (the message says why)."""


def _gradcam_fn() -> Any:
    try:
        module = importlib.import_module("imclass.explain")
    except ImportError:
        return None
    return getattr(module, "gradcam", None)


def explain_available() -> bool:
    """Whether ``imclass.explain`` provides Grad-CAM in this installation."""
    return _gradcam_fn() is not None


def gradcam_overlay(predictor: Any, image: torch.Tensor, target: int | None = None) -> dict:
    """Grad-CAM (``imclass.explain.gradcam``, Captum's ``LayerGradCam`` at the last conv layer) of ``image``
    (uint8 (C, H, W)) for ``target`` (default: the predicted class), blended over the image:
    ``{"class", "index", "probability", "layer", "overlay": "data:image/png;base64,..."}``."""
    fn = _gradcam_fn()
    if fn is None:
        raise ExplainUnavailable("Grad-CAM is not available: this installation has no imclass.explain")
    if predictor.kind not in ("classifier", "model"):
        raise ExplainUnavailable(f"Grad-CAM needs a neural network; model {predictor.name!r} is a {predictor.kind}")
    if target is not None and not 0 <= target < len(predictor.classes):
        raise ExplainUnavailable(f"expected target in 0..{len(predictor.classes) - 1}, received {target}")
    with predictor._lock:
        try:
            found = fn(predictor.backend, image, target=target)
        except ValueError as err:  # e.g. a network without a convolution layer
            raise ExplainUnavailable(f"no Grad-CAM for model {predictor.name!r}: {err}") from None
    index = int(found.target)
    return {"class": predictor.classes[index] if index < len(predictor.classes) else found.target_name,
            "index": index, "probability": float(found.probability), "layer": found.details.get("layer"),
            "overlay": _overlay_png(image, found.heatmap.float())}


def _overlay_png(image: torch.Tensor, heat: torch.Tensor) -> str:
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
