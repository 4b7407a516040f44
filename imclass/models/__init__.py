"""Architectures by name: ``create(name, **options)``, ``names(pattern)``, ``register_model``.

One architecture family per module; importing this package registers them all.
"""
from __future__ import annotations

import importlib

from imclass.layers import Sequential
from imclass.models._registry import create, names, register_model, register_prefix
from imclass.models.functional import Input, Model

__all__ = ["Input", "Model", "Sequential", "create", "load_model", "names", "register_model", "register_prefix"]


def load_model(filepath, device: str = "auto"):
    """Keras's ``load_model``: the model a ``model.save(path)`` wrote (see ``imclass.train.keras.load_model``)."""
    from imclass.train.keras import load_model as _load_model

    return _load_model(filepath, device=device)

# Families that register themselves on import (one module per family).
_FAMILIES = ["course", "lenet", "alexnet", "resnet", "fastnet", "timm_models", "torchvision_models", "transfer_net"]

for _family in _FAMILIES:
    importlib.import_module(f"imclass.models.{_family}")
