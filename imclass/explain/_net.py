"""Glue shared by the explanations: a loaded model as a differentiable function of [0, 1] pixels,
its layers by name, its feature vectors, and the class an explanation is for."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from imclass.data.arrays import as_images, as_tensor, is_channels_last
from imclass.data.progress import Progress
from imclass.data.source import inference_batch_size
from imclass.train.memory import retain_freed_memory


class _Normalise(nn.Module):
    """[0, 1] pixels -> the model's normalised input, so attributions are per pixel of the image."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@dataclass
class Net:
    """A model seen from outside: ``forward`` maps float (N, C, H, W) pixels on [0, 1] to logits
    (``None`` for a k-NN); ``probs`` maps them to class probabilities; ``module`` is the network whose
    layers are named (``None`` for a k-NN)."""

    forward: nn.Module | None
    module: nn.Module | None
    knn: Any
    classes: list[str]
    input_size: tuple[int, ...] | None
    device: torch.device

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, C) of float [0, 1] pixels (vote shares for a k-NN)."""
        if self.knn is not None:
            images = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
            shares = self.knn.predict_proba(images).float()
            full = torch.zeros(len(shares), len(self.classes))
            full[:, torch.as_tensor(self.knn.classes_).long()] = shares
            return full.to(x.device)
        logits = self.forward(x)
        return torch.cat([1 - logits.sigmoid(), logits.sigmoid()], 1) if logits.shape[1] == 1 else logits.softmax(1)

    def need_network(self, method: str) -> nn.Module:
        """The network, or a clear error naming ``method`` for a k-NN (it has no layers or gradients)."""
        if self.knn is not None:
            raise ValueError(f"{method} needs a neural network; a k-NN model has no layers or gradients "
                             "(occlusion, neighbours, tsne and same-l2 work on a k-NN)")
        return self.forward


def as_net(model: Any) -> Net:
    """Wrap what ``imclass.load`` returns (a ``Classifier``, a ``KNN`` or a bare ``nn.Module`` taking
    [0, 1] pixels) as a ``Net``."""
    if hasattr(model, "kneighbors") and hasattr(model, "classes_"):
        n = int(torch.as_tensor(model.classes_).max()) + 1
        classes = list(getattr(model, "class_names", None) or [str(i) for i in range(n)])
        shape = getattr(model, "sample_shape_", None)
        return Net(None, None, model, classes, tuple(shape) if shape else None, torch.device("cpu"))
    if hasattr(model, "model") and hasattr(model, "mean") and isinstance(model.model, nn.Module):  # a Classifier
        if model.mean is None or model.std is None:
            raise ValueError("the classifier has no input normalisation yet: train it (fit) or load a saved one")
        module = model.model.eval()
        forward = nn.Sequential(_Normalise(model.mean, model.std).to(model.device), module).eval()
        classes = list(model.classes or [])
        return Net(forward, module, None, classes, getattr(model, "input_size", None), model.device)
    if isinstance(model, nn.Module):
        module = model.eval()
        device = next(iter(module.parameters()), torch.empty(0)).device
        return Net(module, module, None, [], None, device)
    raise TypeError(f"expected a Classifier, a KNN or a torch.nn.Module (what imclass.load returns), "
                    f"received {type(model).__name__}")


def one_image(image: Any, net: Net) -> torch.Tensor:
    """One image (uint8 or [0, 1] float, (C, H, W) or (1, C, H, W)) as float (1, C, H, W) on [0, 1]."""
    x = as_tensor(image, name="image")
    if is_channels_last(tuple(x.shape)):  # (H, W, C) from PIL / numpy
        x = x.permute(2, 0, 1)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or len(x) != 1:
        raise ValueError(f"expected one image (C, H, W), received shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.is_floating_point():
        x = x.float()
    else:
        raise TypeError(f"expected a uint8 image, or float pixels on [0, 1], received dtype {x.dtype}")
    if net.input_size is not None and tuple(x.shape[1:]) != tuple(net.input_size):
        raise ValueError(f"expected an image of shape {tuple(net.input_size)} (C, H, W) for this model, "
                         f"received {tuple(x.shape[1:])}: resize it as the model was trained")
    return x.to(net.device)


def resolve_target(net: Net, target: int | str | None, probs: torch.Tensor) -> int:
    """A class index from an index, a class name or ``None`` (the predicted class)."""
    n = probs.shape[1]
    if target is None:
        return int(probs.argmax(1)[0])
    if isinstance(target, str) and not target.lstrip("-").isdigit():
        if target not in net.classes:
            known = ", ".join(net.classes[:12]) + (" ..." if len(net.classes) > 12 else "")
            raise ValueError(f"unknown class {target!r}; this model's classes: {known or 'unnamed, use 0..' + str(n - 1)}")
        return net.classes.index(target)
    index = int(target)
    if not 0 <= index < n:
        raise ValueError(f"expected a target class in 0..{n - 1}, received {index}")
    return index


def class_name(net: Net, index: int) -> str:
    """The name of class ``index`` (its number when the model has no names)."""
    return net.classes[index] if index < len(net.classes) else str(index)


def layer_names(module: nn.Module) -> list[str]:
    """Names of every sub-module (``model.named_modules()``), the values ``--layer`` takes."""
    return [name for name, _ in module.named_modules() if name]


def find_layer(module: nn.Module, name: str | None, kind: type | tuple = nn.Conv2d, last: bool = True) -> tuple[str, nn.Module]:
    """The sub-module called ``name``, else the last (or first) module of ``kind``; errors list the names."""
    modules = dict(module.named_modules())
    if name is not None:
        if name not in modules or not name:
            names = layer_names(module)
            near = [n for n in names if name in n][:8] or names[:12]
            raise ValueError(f"unknown layer {name!r}; layers include: {', '.join(near)}"
                             + (" ..." if len(names) > len(near) else ""))
        return name, modules[name]
    found = [(n, m) for n, m in modules.items() if isinstance(m, kind)]
    if not found:
        raise ValueError(f"the model has no {getattr(kind, '__name__', 'such')} layer; name one with layer= (--layer)")
    return found[-1] if last else found[0]


def features(net: Net, images: torch.Tensor, batch_size: int | None = None, *, progress: bool = True) -> torch.Tensor:
    """Feature vectors (N, D) of uint8 images: what the classifier head sees (``forward_head(...,
    pre_logits=True)`` of the timm contract, else the input of the last ``nn.Linear``); raw pixels for a k-NN.
    ``batch_size``: default ``inference_batch_size`` of the images' size (about 2 M pixels a batch, so the
    activations stay bounded: 256 images at 224 px held 6.5 GB). ``progress``: a progress line on stderr
    (tqdm on a terminal) for 256 images or more."""
    images = as_images(images)
    if net.knn is not None:
        return images.flatten(1).float()
    batch_size = batch_size or inference_batch_size(images.shape[1:])
    if torch.device(net.device).type == "cpu":
        retain_freed_memory()  # the forward's activations reuse freed memory instead of faulting in new pages
    module = net.module
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    has_contract = hasattr(module, "forward_features") and hasattr(module, "forward_head")
    if not has_contract and not linears:
        raise ValueError("cannot find the model's features: it has neither forward_features/forward_head nor a Linear layer")
    captured: list[torch.Tensor] = []
    hook = None
    if not has_contract:
        hook = linears[-1].register_forward_hook(lambda m, inp, out: captured.append(inp[0].flatten(1)))
    out = []
    bar = Progress(len(images), "model features", verbose=progress and len(images) >= 256)
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = net.forward[0](images[start : start + batch_size].to(net.device).float() / 255.0) \
                    if isinstance(net.forward, nn.Sequential) and isinstance(net.forward[0], _Normalise) \
                    else images[start : start + batch_size].to(net.device).float() / 255.0
                if has_contract:
                    out.append(module.forward_head(module.forward_features(x), pre_logits=True).flatten(1).float().cpu())
                else:
                    module(x)
                    out.append(captured.pop().float().cpu())
                bar.update(len(out[-1]))
    finally:
        bar.close()
        if hook is not None:
            hook.remove()
    return torch.cat(out)
