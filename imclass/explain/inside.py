"""What a network has learned: its first-layer filters as images (the course's picture) and the
activation maps of a named layer for one image."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from imclass.explain._net import as_net, find_layer, one_image
from imclass.explain.pictures import save_map_grid
from imclass.visualize.images import save_image_grid

__all__ = ["filter_images", "save_filters", "activations", "save_activations"]


def filter_images(model: Any, layer: str | None = None) -> tuple[str, torch.Tensor]:
    """The kernels of a Conv2d (default: the first) as (O, 3 or 1, kh, kw) images on [0, 1], each
    scaled by its own min and max (as the course shows them); a kernel over other than 3 input
    channels is shown as the mean over them, in grey. Returns (layer name, images)."""
    net = as_net(model)
    net.need_network("filters")
    name, conv = find_layer(net.module, layer, nn.Conv2d, last=False)
    if not isinstance(conv, nn.Conv2d):
        raise ValueError(f"layer {name!r} is a {type(conv).__name__}, expected a Conv2d to draw its filters")
    w = conv.weight.detach().float().cpu()  # (O, I/groups, kh, kw)
    if w.shape[1] != 3:
        w = w.mean(1, keepdim=True)
    lo = w.flatten(1).min(1).values.view(-1, 1, 1, 1)
    hi = w.flatten(1).max(1).values.view(-1, 1, 1, 1)
    return name, (w - lo) / (hi - lo).clamp(min=1e-12)


def save_filters(model: Any, path: str | Path, layer: str | None = None, *, cols: int = 16, scale: int | None = None) -> dict[str, Any]:
    """Write the filters of ``layer`` (default: the first Conv2d) as a PNG grid of ``cols`` columns,
    each kernel pixel drawn as a ``scale`` x ``scale`` block (nearest neighbour). Returns a summary."""
    name, imgs = filter_images(model, layer)
    k = imgs.shape[-1]
    scale = scale or max(4, 48 // k)
    rows = [list(imgs[i : i + cols]) for i in range(0, len(imgs), cols)]
    kind = "RGB" if imgs.shape[1] == 3 else "grey: the mean over the input channels"
    title = f"filters of {name}: {len(imgs)} kernels of {imgs.shape[-2]}x{k} ({kind}; each scaled to its own min..max)"
    save_image_grid(rows, path, scale=scale, pad=2, title=title)
    return {"method": "filters", "layer": name, "title": title, "filters": len(imgs), "kernel": list(imgs.shape[1:]),
            "scale": scale, "cols": cols, "out": str(path)}


def activations(model: Any, image: Any, layer: str | None = None) -> tuple[str, torch.Tensor]:
    """The output (K, h, w) of ``layer`` (a name from ``named_modules()``; default: the first Conv2d)
    for one image, captured by a forward hook. Returns (layer name, maps)."""
    net = as_net(model)
    forward = net.need_network("activations")
    name, module = find_layer(net.module, layer, nn.Conv2d, last=False)
    x = one_image(image, net)
    seen: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda m, inp, out: seen.append(out if torch.is_tensor(out) else out[0]))
    try:
        with torch.no_grad():
            forward(x)
    finally:
        hook.remove()
    if not seen:
        raise ValueError(f"layer {name!r} did not run for this input")
    out = seen[0][0].float().cpu()
    if out.ndim == 1:  # a Linear layer: its units as a 1 x K strip
        out = out.view(1, 1, -1)
    if out.ndim != 3:
        raise ValueError(f"layer {name!r} gives output of shape {tuple(seen[0].shape)}; expected (N, K, h, w) maps")
    return name, out


def save_activations(model: Any, image: Any, path: str | Path, layer: str | None = None, *, max_maps: int = 63) -> dict[str, Any]:
    """Write the first ``max_maps`` activation maps of ``layer`` for ``image`` as a PNG grid, after the image."""
    net = as_net(model)
    name, maps = activations(model, image, layer)
    x = one_image(image, net)[0].cpu()
    save_map_grid(maps[:max_maps], path, title=f"activations of {name} ({maps.shape[0]} maps of {maps.shape[1]}x{maps.shape[2]})",
                  image=x)
    mean = maps.flatten(1).mean(1)
    return {"method": "activations", "layer": name, "maps": maps.shape[0], "map_size": list(maps.shape[1:]),
            "shown": min(max_maps, maps.shape[0]), "most_active": [int(i) for i in mean.argsort(descending=True)[:5]],
            "out": str(path)}
