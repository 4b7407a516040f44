"""Class imbalance: per-class loss weights and a balanced sampler for ``Classifier.fit``.

* ``class_weight="balanced"`` weights the loss of class ``c`` by ``n / (k * n_c)`` (scikit-learn's
  ``compute_class_weight``, Keras's ``class_weight``); a list (one weight per class) or a dict
  (class index or name -> weight, missing classes 1.0) gives them explicitly.
* ``sampler="balanced"`` draws each epoch's ``n`` training images with replacement, each with
  probability proportional to ``1 / n_c`` (PyTorch's ``WeightedRandomSampler``): every class is
  seen about equally often.
"""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch

# Deferred imports (inside functions), for start-up time: sklearn.utils.class_weight
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

SAMPLERS = (None, "balanced")

__all__ = ["SAMPLERS", "class_weights", "parse_class_weight", "sample_weights"]


def class_weights(spec: Any, labels: torch.Tensor, classes: Sequence[str]) -> torch.Tensor | None:
    """The loss weight of each class (float32, one per class) for ``class_weight=spec``; None for None.

    ``spec``: ``"balanced"``, a sequence of one weight per class, or a mapping from class index or
    class name to weight. Raises a ValueError naming what is wrong (unknown class, wrong length,
    a weight that is not a positive finite number, a class with no training image under "balanced").
    """
    if spec is None:
        return None
    if labels.ndim != 1:
        raise ValueError(f"class_weight needs one class index per image, received labels of shape {tuple(labels.shape)}")
    k = len(classes)
    if isinstance(spec, str):
        if spec != "balanced":
            raise ValueError(f"expected class_weight 'balanced', a list or a dict, received {spec!r}")
        from sklearn.utils.class_weight import compute_class_weight

        counts = torch.bincount(labels.cpu(), minlength=k)
        missing = [classes[c] for c in range(k) if counts[c] == 0]
        if missing:
            raise ValueError(f"class_weight='balanced' needs training images of every class; none of {missing}")
        weights = compute_class_weight("balanced", classes=np.arange(k), y=labels.cpu().numpy())
        return torch.tensor(weights, dtype=torch.float32)
    if isinstance(spec, Mapping):
        weights = [1.0] * k
        for key, value in spec.items():
            index = _class_index(key, classes)
            weights[index] = value
    elif isinstance(spec, (list, tuple, torch.Tensor)):
        weights = [float(w) for w in spec]
        if len(weights) != k:
            raise ValueError(f"expected class_weight with one weight per class ({k}), received {len(weights)}")
    else:
        raise TypeError(f"expected class_weight 'balanced', a list or a dict, received {type(spec).__name__}")
    bad = [w for w in weights if not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0]
    if bad:
        raise ValueError(f"expected positive finite class weights, received {bad}")
    return torch.tensor([float(w) for w in weights], dtype=torch.float32)


def _class_index(key: Any, classes: Sequence[str]) -> int:
    if isinstance(key, str) and key in classes:
        return list(classes).index(key)
    try:
        index = int(key)
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < len(classes):
        raise ValueError(f"class_weight names an unknown class {key!r}: expected an index 0..{len(classes) - 1} "
                         f"or one of {list(classes)}")
    return index


def sample_weights(sampler: str | None, labels: torch.Tensor) -> torch.Tensor | None:
    """Per-image drawing weights (float64, ``1 / n_c``) for ``sampler="balanced"``; None for None."""
    if sampler not in SAMPLERS:
        raise ValueError(f"expected sampler None or 'balanced', received sampler={sampler!r}")
    if sampler is None:
        return None
    if labels.ndim != 1:
        raise ValueError(f"sampler='balanced' needs one class index per image, received labels of shape {tuple(labels.shape)}")
    counts = torch.bincount(labels.cpu()).to(torch.float64)
    return (1.0 / counts)[labels.cpu()]


def parse_class_weight(text: str | None) -> str | list[float] | dict | None:
    """Command-line ``--class-weight``: ``balanced``, ``none``, ``1,5,1`` or JSON (``{"cat": 3}``)."""
    if text is None or text.strip().lower() in ("", "none"):
        return None
    text = text.strip()
    if text.lower() == "balanced":
        return "balanced"
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = [float(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"expected --class-weight balanced, a list like 1,5,1 or JSON, received {text!r}") from None
    if isinstance(value, (int, float)):
        value = [float(value)]
    if not isinstance(value, (list, dict)):
        raise ValueError(f"expected --class-weight balanced, a list like 1,5,1 or JSON, received {text!r}")
    return value
