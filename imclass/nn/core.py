"""The course's core layers: ``Dense``, ``Dropout``, ``Flatten``, ``BatchNormalization``,
``Activation``, ``LeakyReLU``, and how an ``activation=`` argument is read, stored and built."""
from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import torch.nn as nn

from imclass.activations import create_activation, resolve_activation, width_factor
from imclass.nn.layer import Layer, keras_init
from imclass.nn.shapes import Shape, check_int, format_shape, to_channels_first

__all__ = ["Activation", "BatchNormalization", "Dense", "Dropout", "Flatten", "LeakyReLU", "activation_config",
           "activation_modules", "activation_width", "parse_activation"]


def parse_activation(value: Any) -> tuple[str, dict[str, Any]] | None:
    """``"relu"``, ``{"name": "leaky_relu", "alpha": 0.2}``, ``Activation(...)`` or None -> (name, params)."""
    if value is None:
        return None
    if isinstance(value, Activation):
        return value.activation, dict(value.params)
    if isinstance(value, dict):
        params = dict(value)
        if "name" not in params:
            raise ValueError(f"expected an activation config with a 'name' key, received {value!r}")
        name, full = resolve_activation(params.pop("name"), **params)
    elif isinstance(value, str):
        name, full = resolve_activation(value)
    else:
        raise ValueError(f"expected an activation name such as 'relu' or an Activation(...), received {value!r}")
    return None if name == "linear" else (name, full)


def activation_config(spec: tuple[str, dict[str, Any]] | None) -> Any:
    """The JSON form of a parsed activation: its name alone when its parameters are the defaults."""
    if spec is None:
        return None
    name, params = spec
    defaults = resolve_activation(name)[1]
    return name if params == defaults else {"name": name, **params}


def activation_modules(spec: tuple[str, dict[str, Any]] | None) -> list[tuple[str, nn.Module]]:
    """The torch module of a parsed activation, as ``(name suffix, module)`` pairs (none for linear)."""
    if spec is None:
        return []
    return [(f"_{spec[0]}", create_activation(spec[0], **spec[1]))]


def activation_width(spec: tuple[str, dict[str, Any]] | None) -> int:
    """How many pre-activations one output takes (``k`` for maxout, else 1)."""
    return 1 if spec is None else width_factor(spec[0], **spec[1])



class Dense(Layer):
    """Fully connected layer ``y = activation(x @ W + b)`` on flat input ``(N, features)``.

    With ``activation="maxout"`` (``k`` pieces) it computes ``units * k`` pre-activations and keeps
    the max of each group of ``k``, so the output still has ``units`` features.
    """

    prefix = "dense"

    def __init__(self, units: int, activation: Any = None, input_dim: int | None = None, use_bias: bool = True,
                 name: str | None = None, input_shape: int | Sequence[int] | None = None):
        if input_dim is not None:
            check_int("input_dim", input_dim)
            if input_shape is not None and to_channels_first(input_shape) != (input_dim,):
                raise ValueError(f"input_dim={input_dim} and input_shape={input_shape!r} disagree; give one of them")
            input_shape = (input_dim,)
        super().__init__(name, input_shape)
        self.units = check_int("units", units)
        self.activation = parse_activation(activation)
        self.use_bias = bool(use_bias)

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 1:
            raise ValueError(
                f"Dense expects flat input (N, features), received {format_shape(input_shape)} from the previous layer; "
                "add Flatten() (or GlobalAveragePooling2D()) before Dense"
            )
        return (self.units,)

    def build(self, input_shape: Shape) -> list[tuple[str, nn.Module]]:
        self.compute_output_shape(input_shape)
        linear = nn.Linear(input_shape[0], self.units * activation_width(self.activation), bias=self.use_bias)
        keras_init(linear)
        return [("", linear), *activation_modules(self.activation)]

    def get_config(self) -> dict[str, Any]:
        return {"units": self.units, "activation": activation_config(self.activation),
                "use_bias": self.use_bias, **super().get_config()}



class Dropout(Layer):
    """During training, zero each value with probability ``rate`` and scale the rest by ``1/(1-rate)``."""

    prefix = "dropout"

    def __init__(self, rate: float, name: str | None = None, input_shape: int | Sequence[int] | None = None):
        super().__init__(name, input_shape)
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
            raise ValueError(f"expected a rate in [0, 1), received rate={rate!r}")
        self.rate = float(rate)

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        return input_shape

    def build(self, input_shape: Shape) -> list[tuple[str, nn.Module]]:
        return [("", nn.Dropout(self.rate))]

    def get_config(self) -> dict[str, Any]:
        return {"rate": self.rate, **super().get_config()}


class Flatten(Layer):
    """``(N, C, H, W) -> (N, C*H*W)`` (channels-first order, as PyTorch stores images)."""

    prefix = "flatten"

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        return (math.prod(input_shape),)

    def build(self, input_shape: Shape) -> list[tuple[str, nn.Module]]:
        return [("", nn.Flatten())]


class BatchNormalization(Layer):
    """Normalise each channel (or feature) by batch statistics, then scale and shift (learned).

    Keras conventions: ``momentum=0.99`` is the weight of the *old* running statistics (PyTorch's
    momentum is ``1 - momentum``), ``epsilon=1e-3``.
    """

    prefix = "batch_normalization"

    def __init__(self, momentum: float = 0.99, epsilon: float = 1e-3, name: str | None = None,
                 input_shape: int | Sequence[int] | None = None):
        super().__init__(name, input_shape)
        if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real) or not 0 <= momentum < 1:
            raise ValueError(f"expected a momentum in [0, 1), received momentum={momentum!r}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or epsilon <= 0:
            raise ValueError(f"expected a positive epsilon, received epsilon={epsilon!r}")
        self.momentum, self.epsilon = float(momentum), float(epsilon)

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) not in (1, 3):
            raise ValueError(f"BatchNormalization expects (N, features) or (N, C, H, W), received {format_shape(input_shape)}")
        return input_shape

    def build(self, input_shape: Shape) -> list[tuple[str, nn.Module]]:
        self.compute_output_shape(input_shape)
        cls = nn.BatchNorm1d if len(input_shape) == 1 else nn.BatchNorm2d
        return [("", cls(input_shape[0], eps=self.epsilon, momentum=1.0 - self.momentum))]

    def get_config(self) -> dict[str, Any]:
        return {"momentum": self.momentum, "epsilon": self.epsilon, **super().get_config()}


class Activation(Layer):
    """An activation by name as its own layer: ``Activation("relu")``, ``Activation("maxout", k=3)``.

    ``maxout`` divides the channel (or feature) count by ``k``.
    """

    prefix = "activation"

    def __init__(self, activation: str, name: str | None = None, input_shape: int | Sequence[int] | None = None,
                 **params: Any):
        super().__init__(name, input_shape)
        self.activation, self.params = resolve_activation(activation, **params)

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        k = width_factor(self.activation, **self.params)
        if input_shape[0] % k:
            raise ValueError(f"maxout with k={k} expects a width divisible by {k}, received {format_shape(input_shape)}")
        return (input_shape[0] // k, *input_shape[1:])

    def build(self, input_shape: Shape) -> list[tuple[str, nn.Module]]:
        self.compute_output_shape(input_shape)
        return [("", create_activation(self.activation, **self.params))]

    def get_config(self) -> dict[str, Any]:
        return {"activation": self.activation, **self.params, **super().get_config()}


class LeakyReLU(Activation):
    """``max(alpha * x, x)``; the course uses ``alpha=0.1`` (Keras's default is 0.3)."""

    prefix = "leaky_re_lu"

    def __init__(self, alpha: float = 0.1, name: str | None = None, input_shape: int | Sequence[int] | None = None):
        super().__init__("leaky_relu", name=name, input_shape=input_shape, alpha=alpha)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        del config["activation"]
        return config
