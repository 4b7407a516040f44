"""Where in an image a model looks: Grad-CAM, gradient saliency and occlusion sensitivity, all
computed by Captum (``LayerGradCam``, ``Saliency``, ``Occlusion``); this module only wires the model
in and draws the overlays (matplotlib)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imclass.explain._net import Net, as_net, class_name, find_layer, one_image, resolve_target
from imclass.explain.pictures import save_overlay

# Deferred imports (inside functions), for start-up time: captum.attr
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["Explanation", "gradcam", "saliency", "occlusion"]


@dataclass
class Explanation:
    """One attribution map of one image: ``heatmap`` (H, W) float, ``attribution`` the raw Captum
    output (C, H, W) or (1, h, w), for class ``target`` (``target_name``, predicted probability
    ``probability``); ``predicted`` is the model's own answer."""

    method: str
    image: torch.Tensor  # (C, H, W) float on [0, 1]
    heatmap: torch.Tensor  # (H, W)
    attribution: torch.Tensor
    target: int
    target_name: str
    probability: float
    predicted: str
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures: the method, class, probability and where the map's mass lies."""
        h = self.heatmap.clamp(min=0)
        total = float(h.sum())
        ys, xs = torch.meshgrid(torch.arange(h.shape[0]), torch.arange(h.shape[1]), indexing="ij")
        centre = [float((h * ys).sum() / total), float((h * xs).sum() / total)] if total > 0 else None
        return {"method": self.method, "target": self.target, "target_name": self.target_name,
                "probability": self.probability, "predicted": self.predicted, "mass_centre_yx": centre, **self.details}

    def save(self, path: str | Path) -> Path:
        """Write a PNG: the image, the heatmap, and the heatmap laid over the image."""
        title = f"{self.method} for '{self.target_name}' (p={self.probability:.2f}; predicted '{self.predicted}')"
        if self.details.get("layer"):
            title += f"\nlayer {self.details['layer']}"
        return save_overlay(self.image, self.heatmap, path, title=title, signed=self.method == "occlusion")


def _setup(model: Any, image: Any, target: int | str | None) -> tuple[Net, torch.Tensor, int, torch.Tensor]:
    net = as_net(model)
    x = one_image(image, net)
    with torch.no_grad():
        probs = net.probs(x)
    if not net.classes:
        net.classes = [str(i) for i in range(probs.shape[1])]
    return net, x, resolve_target(net, target, probs), probs


def _explanation(method, net, x, t, probs, heatmap, attribution, **details) -> Explanation:
    return Explanation(method, x[0].detach().cpu(), heatmap.detach().float().cpu(), attribution.detach().cpu(), t,
                       class_name(net, t), float(probs[0, t]), class_name(net, int(probs.argmax(1)[0])), details)


def gradcam(model: Any, image: Any, target: int | str | None = None, layer: str | None = None) -> Explanation:
    """Grad-CAM (Selvaraju et al.) of ``image`` for class ``target`` (index or name; default: the
    predicted class) at ``layer`` (a name from ``model.named_modules()``; default: the last Conv2d),
    by ``captum.attr.LayerGradCam`` with ReLU, upsampled to the image size (bilinear)."""
    from captum.attr import LayerAttribution, LayerGradCam

    net, x, t, probs = _setup(model, image, target)
    forward = net.need_network("Grad-CAM")
    name, module = find_layer(net.module, layer)
    cam = LayerGradCam(forward, module).attribute(x, target=t, relu_attributions=True)  # (1, 1, h, w)
    up = LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), interpolate_mode="bilinear")
    return _explanation("Grad-CAM", net, x, t, probs, up[0, 0], cam[0], layer=name, layer_map_size=list(cam.shape[-2:]))


def saliency(model: Any, image: Any, target: int | str | None = None) -> Explanation:
    """Gradient saliency (Simonyan et al.): |d score_target / d pixel| by ``captum.attr.Saliency``,
    the class score being the logit; the heatmap is the maximum over colour channels."""
    from captum.attr import Saliency

    net, x, t, probs = _setup(model, image, target)
    forward = net.need_network("saliency")
    grads = Saliency(forward).attribute(x.clone().requires_grad_(True), target=t, abs=True)  # (1, C, H, W)
    return _explanation("saliency", net, x, t, probs, grads[0].amax(0), grads[0])


def occlusion(model: Any, image: Any, target: int | str | None = None, window: int | None = None,
              stride: int | None = None, fill: float = 0.5, batch: int = 32) -> Explanation:
    """Occlusion sensitivity (Zeiler & Fergus): slide a ``window`` x ``window`` patch of grey ``fill``
    (on the [0, 1] pixel scale) over the image with ``stride`` and map the drop in the target class's
    probability, by ``captum.attr.Occlusion``. Works for every model kind, a k-NN included."""
    from captum.attr import Occlusion

    net, x, t, probs = _setup(model, image, target)
    c, h, w = x.shape[1:]
    window = window or max(2, min(h, w) // 6)
    stride = stride or max(1, window // 2)
    if not 1 <= window <= min(h, w) or stride < 1:
        raise ValueError(f"expected 1 <= window <= {min(h, w)} and stride >= 1, received window={window}, stride={stride}")

    def score(batch_x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return net.probs(batch_x)

    attr = Occlusion(score).attribute(x, sliding_window_shapes=(c, window, window), strides=(c, stride, stride),
                                      baselines=fill, target=t, perturbations_per_eval=batch)  # (1, C, H, W)
    return _explanation("occlusion", net, x, t, probs, attr[0].mean(0), attr[0], window=window, stride=stride, fill=fill)
