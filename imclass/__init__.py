"""imclass: image classification the way the course teaches it.

The public API reads like the course::

    import imclass
    train = imclass.data.load("cifar10", split="train")
    knn = imclass.KNN(k=1, metric="l1").fit(train.images, train.labels)
    model = imclass.Sequential([...], input_shape=(32, 32, 3))
    clf = imclass.Classifier(model).compile("adam", lr=1e-3)
    clf.fit(train, epochs=10)

Names are imported lazily so that ``import imclass`` stays fast (the CLI starts quickly).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "KNN": "imclass.knn",
    "NearestNeighbor": "imclass.knn",
    "choose_k": "imclass.knn",
    "Sequential": "imclass.layers",
    "summary": "imclass.summarize",
    "Classifier": "imclass.train",
    "save": "imclass.io",
    "load": "imclass.io",
}
_SUBMODULES = {"data", "models", "layers", "train", "evaluate", "visualize", "knn", "io", "cli", "summarize",
               "losses", "optimizers", "callbacks", "applications", "utils"}  # the last five: Keras's paths

__all__ = sorted(_LAZY) + sorted(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"imclass.{name}")
    raise AttributeError(f"module 'imclass' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
