"""Name -> factory registry for architectures (the timm way).

Each architecture variant is a small decorated factory::

    @register_model
    def resnet20(num_classes: int = 10, in_chans: int = 3, **kw) -> nn.Module: ...

``create(name, **options)`` builds it and records ``model.imclass_spec = {"name", "options"}``
so that a saved model file can rebuild exactly the same architecture.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_PREFIX_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Register an architecture factory under its function name (or ``name``)."""

    def wrap(f: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or f.__name__
        if key in _MODELS:
            raise ValueError(f"model name {key!r} is already registered")
        _MODELS[key] = f
        return f

    return wrap(fn) if fn is not None else wrap


def register_prefix(prefix: str, factory: Callable[..., nn.Module]) -> None:
    """Register a family of names ``prefix:<anything>`` (e.g. ``timm:resnet18``)."""
    _PREFIX_FACTORIES[prefix] = factory


def names(pattern: str = "*") -> list[str]:
    """Sorted registered architecture names matching a shell-style pattern."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def require(name: str) -> None:
    """Raise the ``ValueError`` that ``create(name)`` would for a name no factory answers to, without
    building anything (a command checks its ``--model`` before it reads any data)."""
    if ":" in name:
        prefix = name.split(":", 1)[0]
        if prefix not in _PREFIX_FACTORIES:
            raise ValueError(f"unknown model family {prefix!r} in {name!r}; known: {sorted(_PREFIX_FACTORIES)}")
    elif name not in _MODELS:
        close = [n for n in _MODELS if name.lower() in n.lower()]
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Known models: {sorted(_MODELS)}")


def create(name: str, **options: Any) -> nn.Module:
    """Build the architecture ``name`` with keyword ``options`` (e.g. ``num_classes=10``)."""
    require(name)
    if ":" in name:
        prefix, rest = name.split(":", 1)
        model = _PREFIX_FACTORIES[prefix](rest, **options)
    else:
        model = _MODELS[name](**options)
    model.imclass_spec = {"name": name, "options": dict(options)}
    return model


def model_doc(name: str) -> str:
    """The docstring of the factory registered as ``name``, stripped ("" without one)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(_MODELS)}")
    return (_MODELS[name].__doc__ or "").strip()
