"""Activation functions by name, resolved to ``torch.nn`` modules once, at the edge.

Names: ``linear``, ``relu``, ``sigmoid``, ``tanh``, ``leaky_relu`` (``alpha``, default 0.1 as in
the course), ``elu`` (``alpha``, default 1.0), ``gelu``, ``softmax`` (over the class/channel
dimension 1) and ``maxout`` (``k`` pieces, default 2).

Maxout changes the width: it takes ``(N, C*k, ...)`` and returns ``(N, C, ...)``, so a layer
written ``Dense(units, activation="maxout")`` computes ``units * k`` pre-activations
(:func:`width_factor` tells the layer how many).
"""
from __future__ import annotations

import numbers
from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = ["Maxout", "activation_names", "create_activation", "resolve_activation", "width_factor"]


class Maxout(nn.Module):
    """Maxout (Goodfellow et al. 2013): each output is the max over ``k`` linear pieces.

    Input ``(N, C*k, ...)``, output ``(N, C, ...)``: output channel ``c`` is the max of input
    channels ``c*k, c*k+1, ..., c*k+k-1`` (consecutive pieces).
    """

    def __init__(self, k: int = 2):
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise ValueError(f"expected a positive integer for k (maxout pieces), received k={k!r}")
        self.k = int(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[1]
        if width % self.k:
            raise ValueError(f"maxout with k={self.k} expects a width divisible by {self.k}, received {width}")
        return x.unflatten(1, (width // self.k, self.k)).amax(dim=2)  # (N, C*k, ...) -> (N, C, k, ...) -> (N, C, ...)

    def extra_repr(self) -> str:
        return f"k={self.k}"


# name -> (factory taking the parameters, default parameters)
_ACTIVATIONS: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {
    "linear": (nn.Identity, {}),
    "relu": (nn.ReLU, {}),
    "sigmoid": (nn.Sigmoid, {}),
    "tanh": (nn.Tanh, {}),
    "leaky_relu": (lambda alpha: nn.LeakyReLU(alpha), {"alpha": 0.1}),
    "elu": (lambda alpha: nn.ELU(alpha), {"alpha": 1.0}),
    "gelu": (nn.GELU, {}),
    "softmax": (lambda: nn.Softmax(dim=1), {}),
    "maxout": (lambda k: Maxout(k), {"k": 2}),
}


def activation_names() -> list[str]:
    """The activation names understood by layers and :func:`create_activation`."""
    return sorted(_ACTIVATIONS)


def resolve_activation(name: str, **params: Any) -> tuple[str, dict[str, Any]]:
    """Check an activation name and its parameters; return ``(name, params with defaults)``."""
    if not isinstance(name, str) or name.lower() not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {activation_names()}")
    name = name.lower()
    defaults = _ACTIVATIONS[name][1]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        allowed = sorted(defaults) or "none"
        raise ValueError(f"activation {name!r} takes parameters {allowed}, received {unknown}")
    full = {**defaults, **params}
    if name == "maxout" and (isinstance(full["k"], bool) or not isinstance(full["k"], numbers.Integral) or full["k"] < 1):
        raise ValueError(f"expected a positive integer for k (maxout pieces), received k={full['k']!r}")
    if name in ("leaky_relu", "elu") and (isinstance(full["alpha"], bool) or not isinstance(full["alpha"], numbers.Real)):
        raise ValueError(f"expected a number for alpha, received alpha={full['alpha']!r}")
    if "alpha" in full:
        full["alpha"] = float(full["alpha"])
    if "k" in full:
        full["k"] = int(full["k"])
    return name, full


def create_activation(name: str, **params: Any) -> nn.Module:
    """The ``torch.nn`` module for an activation name, e.g. ``create_activation("leaky_relu", alpha=0.2)``."""
    name, full = resolve_activation(name, **params)
    return _ACTIVATIONS[name][0](**full)


def width_factor(name: str, **params: Any) -> int:
    """How many pre-activations an activation consumes per output (``k`` for maxout, else 1)."""
    name, full = resolve_activation(name, **params)
    return full["k"] if name == "maxout" else 1
