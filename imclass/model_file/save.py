"""Writing a model file: ``save`` describes a ``Classifier``, a ``KNN`` or a bare model, all duck-typed
(no model class is imported: a model says how to rebuild it through ``imclass_spec`` or its
``get_config()``), and writes it with ``imclass.model_file.format``."""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from imclass.data.arrays import is_channels_last
from imclass.model_file.format import FORMAT_VERSION, MODEL_FILENAME, jsonable, state_tensors, write_atomic
from imclass.tta import tta_name

__all__ = ["CONFIG_KINDS", "architecture_of", "input_size_of", "num_classes_of", "save"]

# a Keras-style model's get_config()["class_name"] -> the architecture key of the file
CONFIG_KINDS = {"Sequential": "sequential", "Model": "functional"}


def save(
    obj: Any,
    path: str | os.PathLike,
    *,
    classes: list[str] | None = None,
    train_config: dict | None = None,
    input_size: tuple[int, int, int] | list[int] | None = None,
    tta: str | int | None = None,
    metrics: dict[str, float | int] | None = None,
) -> Path:
    """Write ``obj`` (a ``Classifier``, a ``KNN`` or a bare model) to one ``.safetensors`` file.

    ``path`` may be a folder: the file is then ``<folder>/model.safetensors``. Also recorded:
    ``classes`` (names; a Classifier knows its own, a KNN has integer labels 0..n-1 that these
    name), ``train_config`` (the resolved training config; default: a Classifier's ``compile``
    options) and ``input_size`` ``(C, H, W)`` (default: what the object knows: an ``input_size``
    attribute, a Sequential's ``input_shape``, a timm model's ``pretrained_cfg``, a KNN's sample
    shape) and ``tta``, the test-time augmentation the model was evaluated with (default: a
    Classifier's ``tta`` attribute), which ``imclass evaluate`` / ``predict`` / ``serve`` apply by
    default so that they report the number training printed. ``metrics``: numbers measured at
    training time (``{"test_accuracy": 0.91, "epochs": 10}``; names are strings, values finite
    ints or floats, else a ``ValueError`` naming the key), read back by ``load`` as the object's
    ``training_metrics`` and answered by ``GET /models/{name}`` of ``imclass serve``. The write is
    atomic (a temporary file renamed over the target). Returns the path.
    """
    checked_metrics = check_metrics(metrics)  # before anything is written
    path = Path(path)
    if path.is_dir() or (not path.suffix and not path.exists()):
        path = path / MODEL_FILENAME
    if hasattr(obj, "get_state") and hasattr(type(obj), "from_state"):  # a KNN
        tensors, header = knn_payload(obj, classes, input_size)
    elif isinstance(obj, nn.Module):
        tensors, header = module_payload(
            obj, kind="model", classes=classes, mean=None, std=None, input_size=input_size
        )
    elif isinstance(getattr(obj, "model", None), nn.Module):
        tensors, header = module_payload(
            obj.model,
            kind="classifier",
            classes=classes if classes is not None else getattr(obj, "classes", None),
            mean=getattr(obj, "mean", None),
            std=getattr(obj, "std", None),
            input_size=input_size if input_size is not None else input_size_of(obj),
        )
    else:
        raise TypeError(f"expected a Classifier, a KNN or a torch.nn.Module to save, received {type(obj).__name__}")
    tta = tta if tta is not None else getattr(obj, "tta", None)
    if tta is not None:
        header["preprocessing"]["tta"] = tta_name(tta)
    record_image_preprocessing(obj, header["preprocessing"])
    compiled = getattr(obj, "compile_config", None)
    if train_config is None and dataclasses.is_dataclass(compiled):
        train_config = dataclasses.asdict(compiled)  # the Classifier's compile options
    header["train_config"] = jsonable(train_config, "train_config")
    header["metrics"] = checked_metrics
    write_atomic(path, tensors, header)
    return path


def check_metrics(metrics: dict | None) -> dict[str, float | int] | None:
    """``metrics`` as a plain ``{str: int | float}`` dict; a ValueError names the first bad key."""
    if metrics is None:
        return None
    if not isinstance(metrics, dict):
        raise ValueError(f"expected metrics as a dict of name -> number, received {type(metrics).__name__}")
    out: dict[str, float | int] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise ValueError(f"expected metric names as strings, received the key {key!r} ({type(key).__name__})")
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # a 0-d tensor or numpy scalar
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected metric {key!r} as a finite number, received {value!r} ({type(value).__name__})")
        if not math.isfinite(value):
            raise ValueError(f"expected metric {key!r} as a finite number, received {value!r}")
        out[key] = value if isinstance(value, int) else float(value)
    return out


def record_image_preprocessing(obj: Any, pre: dict) -> None:
    """Add ``resize``, ``crop`` and ``interpolation`` of a pretrained backbone's preprocessing (an
    ``imclass.models.weights.Preprocessing`` on the object or its model) to the file's ``preprocessing``."""
    found = getattr(obj, "preprocessing", None) or getattr(getattr(obj, "model", None), "preprocessing", None)
    if not hasattr(found, "to_dict"):
        return
    d = found.to_dict()
    pre.update({k: d[k] for k in ("resize", "crop", "interpolation")})
    for k in ("input_size", "mean", "std"):
        if pre.get(k) is None:
            pre[k] = d[k]


def module_payload(model: nn.Module, *, kind: str, classes, mean, std, input_size) -> tuple[dict, dict]:
    """The tensors and header of a model (``kind`` "model") or of a classifier's model (``kind`` "classifier")."""
    header = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "architecture": architecture_of(model),
        "classes": as_str_list(classes),
        "preprocessing": {
            "mean": as_float_list(mean),
            "std": as_float_list(std),
            "input_size": as_int_list(input_size if input_size is not None else input_size_of(model)),
        },
        "final_activation": getattr(model, "final_activation", None),
    }
    return state_tensors(model.state_dict()), header


def knn_payload(knn: Any, classes: Any, input_size: Any) -> tuple[dict, dict]:
    """The tensors and header of a k-NN classifier (its ``get_state()``)."""
    tensors, config = knn.get_state()
    tensors = {name: torch.as_tensor(t) for name, t in tensors.items()}
    shape = config.get("sample_shape")
    if input_size is None and shape is not None and len(shape) == 3:
        input_size = shape
    header = {
        "format": FORMAT_VERSION,
        "kind": "knn",
        "knn": jsonable(config, "k-NN config"),
        "classes": as_str_list(classes),  # names of the labels 0..n-1, when known
        "preprocessing": {"mean": None, "std": None, "input_size": as_int_list(input_size)},
    }
    return state_tensors(tensors), header


def architecture_of(model: nn.Module) -> dict:
    """How to rebuild ``model``: ``{"name", "options"}`` (the registry), ``{"sequential": config}`` or ``{"functional": config}``."""
    spec = getattr(model, "imclass_spec", None)
    if spec is not None:
        options = dict(spec.get("options", {}))
        heads = num_classes_of(model)
        if heads is not None and heads != options.get("num_classes", heads):
            options["num_classes"] = heads  # reset_classifier(n) was called after create(): rebuild the new head
        return {"name": spec["name"], "options": jsonable(options, "model options")}
    config = model.get_config() if callable(getattr(model, "get_config", None)) else None
    kind = CONFIG_KINDS.get(config.get("class_name")) if isinstance(config, dict) else None
    if kind is not None:  # a Sequential or a functional Model (Keras's API) says which in its config
        return {kind: jsonable(config, f"{config['class_name']} config")}
    raise TypeError(
        f"cannot save a {type(model).__name__}: expected a model built by imclass.models.create(...) "
        "(it records imclass_spec) or an imclass.Sequential (it has get_config())"
    )


def num_classes_of(model: nn.Module) -> int | None:
    """Outputs of the model's classifier now (timm contract), or None when it does not say."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int):
        return n
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return head.out_features if isinstance(head, nn.Linear) else None


def input_size_of(obj: Any) -> list[int] | None:
    """(C, H, W) the object expects, when it says so (Classifier, Sequential, timm model)."""
    for attr in ("input_size", "image_shape"):
        value = getattr(obj, attr, None)
        if value is not None and len(value) == 3:
            return list(value)
    shape = getattr(obj, "input_shape", None)  # imclass.Sequential: (C, H, W); Keras style: (H, W, C)
    if shape is not None and len(shape) == 3:
        return [shape[2], shape[0], shape[1]] if is_channels_last(shape) else list(shape)
    cfg = getattr(obj, "pretrained_cfg", None) or getattr(obj, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return list(cfg["input_size"])
    model = getattr(obj, "model", None)
    if isinstance(model, nn.Module) and model is not obj:
        return input_size_of(model)
    return None


def as_float_list(x: Any) -> list[float] | None:
    """A flat list of floats, or None."""
    if x is None:
        return None
    return [float(v) for v in torch.as_tensor(x, dtype=torch.float64).flatten().tolist()]


def as_int_list(x: Any) -> list[int] | None:
    """A list of ints, or None."""
    return None if x is None else [int(v) for v in x]


def as_str_list(x: Any) -> list[str] | None:
    """A list of strings, or None."""
    return None if x is None else [str(v) for v in x]
