"""Architectures by name: ``create(name, **options)``, ``names(pattern)``, ``register_model``; the
Keras-style models ``Sequential`` and ``Model`` (with ``compile``/``fit``/``evaluate``/``predict``/
``save`` on the engine ``imclass.train``), the applications' timm bodies, and ``load_model``.

One architecture family per module; importing this package registers them all.
"""
from __future__ import annotations

import importlib

from imclass.models._registry import create, names, register_model, register_prefix, require
from imclass.models.functional import Input, Model
from imclass.models.rebuild import load_model
from imclass.models.sequential import Sequential

__all__ = ["Input", "Model", "Sequential", "create", "load_model", "names", "register_model", "register_prefix", "require"]

# Families that register themselves on import (one module per family); the applications' layer
# class registers with the layer registry, so every model config can be rebuilt once this runs.
_FAMILIES = ["course", "lenet", "alexnet", "resnet", "fastnet", "timm_models", "torchvision_models", "transfer_net",
             "applications"]

for _family in _FAMILIES:
    importlib.import_module(f"imclass.models.{_family}")
