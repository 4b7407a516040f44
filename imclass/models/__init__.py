"""Architectures by name: ``create(name, **options)``, ``names(pattern)``, ``register_model``.

One architecture family per module; importing this package registers them all.
"""
from __future__ import annotations

import importlib

from imclass.models._registry import create, names, register_model, register_prefix

__all__ = ["create", "names", "register_model", "register_prefix"]

# Families that register themselves on import (one module per family).
_FAMILIES = ["course", "lenet", "alexnet", "resnet", "fastnet", "timm_models", "torchvision_models", "transfer_net"]

for _family in _FAMILIES:
    importlib.import_module(f"imclass.models.{_family}")
