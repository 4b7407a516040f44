"""The course's layers and a ``Sequential`` builder that reads like Keras and infers shapes.

::

    from imclass.layers import Conv2D, Dense, Dropout, Flatten, MaxPooling2D, Sequential

    model = Sequential([
        Conv2D(32, 3, padding="same", activation="relu", input_shape=(32, 32, 3)),
        MaxPooling2D(2),
        Flatten(),
        Dense(10, activation="softmax"),
    ])

A layer here is a small *specification*: it validates its arguments in ``__init__`` and, given
the shape of its input, ``build``s plain ``torch.nn`` modules and says its output shape.
``Sequential`` builds each layer as it is added, so sizes such as the input of the first
``Dense`` after ``Flatten`` are computed, never written by hand. The result is an ordinary
``nn.Module`` taking float ``(N, C, H, W)`` (or ``(N, features)``) tensors and returning logits.

Input shapes (without the batch dimension) follow one rule:

* an int or a 1-tuple is a flat feature size (``input_dim``);
* a 3-tuple whose last entry is 1, 3 or 4 and whose first entry is not is channels-last
  ``(H, W, C)`` as the course writes it, and becomes ``(C, H, W)``;
* any other 3-tuple is channels-first ``(C, H, W)`` as is;
* a 2-tuple ``(H, W)`` is a one-channel image ``(1, H, W)``.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any, ClassVar, Iterable, Sequence

import torch
import torch.nn as nn

from imclass.activations import Maxout, create_activation, resolve_activation, width_factor

__all__ = [
    "Activation",
    "Add",
    "AveragePooling2D",
    "BatchNormalization",
    "Concatenate",
    "Conv2D",
    "Dense",
    "Dropout",
    "Flatten",
    "GlobalAveragePooling2D",
    "Input",
    "KerasModel",
    "Layer",
    "LeakyReLU",
    "MaxPooling2D",
    "Maxout",
    "ModelLayer",
    "Sequential",
    "conv_output_size",
    "to_channels_first",
]

Shape = tuple[int, ...]


# ----------------------------------------------------------------------------- shapes and checks


def to_channels_first(shape: int | Sequence[int]) -> Shape:
    """Normalise a user input shape to channels-first ``(C, H, W)`` or flat ``(features,)`` (see module doc)."""
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if isinstance(shape, bool):
        raise ValueError(f"expected an input shape such as (32, 32, 3), (3, 32, 32) or 784, received {shape!r}")
    if isinstance(shape, int):
        shape = (shape,)
    try:
        dims = tuple(operator.index(d) for d in shape)
    except TypeError:
        raise ValueError(
            f"expected an input shape such as (32, 32, 3), (3, 32, 32) or 784, received {shape!r}"
        ) from None
    if not 1 <= len(dims) <= 3 or any(d < 1 for d in dims):
        raise ValueError(
            f"expected an input shape (features,), (H, W), (H, W, C) or (C, H, W) of positive sizes, received {shape!r}"
        )
    if len(dims) == 2:
        return (1, *dims)
    if len(dims) == 3 and dims[2] in (1, 3, 4) and dims[0] not in (1, 3, 4):
        return (dims[2], dims[0], dims[1])  # (H, W, C) -> (C, H, W)
    return dims


def conv_output_size(size: int, kernel_size: int, stride: int = 1, padding: int = 0) -> int:
    """The course's formula ``(W - F + 2P) / S + 1`` (rounded down, as every framework does).

    ``conv_output_size(7, 3, 1) == 5`` and ``conv_output_size(7, 3, 2) == 3``.
    """
    for name, value, low in (("size", size, 1), ("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
        _check_int(name, value, low)
    if kernel_size > size + 2 * padding:
        raise ValueError(f"a {kernel_size}-wide filter does not fit a {size}-wide input with padding {padding}")
    return (size - kernel_size + 2 * padding) // stride + 1


def _fmt(shape: Iterable[int]) -> str:
    return "(" + ", ".join(["N", *(str(d) for d in shape)]) + ")"


def _is_int(value: Any, low: int = 1) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low


def _check_int(name: str, value: Any, low: int = 1) -> int:
    if not _is_int(value, low):
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise ValueError(f"expected {kind} for {name}, received {name}={value!r}")
    return int(value)


def _pair(name: str, value: Any) -> tuple[int, int]:
    if _is_int(value):
        return (int(value), int(value))
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"expected a positive integer or a pair of them for {name}, received {name}={value!r}")


def _check_padding(value: Any) -> str:
    if value not in ("valid", "same"):
        raise ValueError(f"expected padding='valid' or padding='same', received padding={value!r}")
    return value


def _needs_image(layer: str, shape: Shape) -> None:
    if len(shape) != 3:
        raise ValueError(f"{layer} expects image input (N, C, H, W), received {_fmt(shape)} from the previous layer")


# ----------------------------------------------------------------------------- activations as arguments

def _parse_activation(value: Any) -> tuple[str, dict[str, Any]] | None:
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


def _activation_config(spec: tuple[str, dict[str, Any]] | None) -> Any:
    if spec is None:
        return None
    name, params = spec
    defaults = resolve_activation(name)[1]
    return name if params == defaults else {"name": name, **params}


def _activation_modules(spec: tuple[str, dict[str, Any]] | None) -> list[tuple[str, nn.Module]]:
    if spec is None:
        return []
    return [(f"_{spec[0]}", create_activation(spec[0], **spec[1]))]


def _width(spec: tuple[str, dict[str, Any]] | None) -> int:
    return 1 if spec is None else width_factor(spec[0], **spec[1])


# ----------------------------------------------------------------------------- layers

_LAYERS: dict[str, type["Layer"]] = {}


class Layer:
    """A course layer: arguments validated in ``__init__``; ``build(input_shape)`` makes torch modules.

    Subclasses define ``prefix`` (the default module name, as in Keras), ``compute_output_shape``,
    ``build`` and ``get_config`` (the ``__init__`` arguments, JSON-able).
    """

    prefix: ClassVar[str] = "layer"

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        _LAYERS[cls.__name__] = cls

    def __init__(self, name: str | None = None, input_shape: int | Sequence[int] | None = None):
        if name is not None and (not isinstance(name, str) or not name.isidentifier()):
            raise ValueError(f"expected a layer name made of letters, digits and '_', received name={name!r}")
        self.name = name
        self.input_shape = None if input_shape is None else to_channels_first(input_shape)

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        """The output shape (without batch) for an input shape (without batch)."""
        raise NotImplementedError

    def build(self, input_shape: Shape) -> list[tuple[str, nn.Module]]:
        """The torch modules computing this layer, as ``(name suffix, module)`` pairs ("" for the main one)."""
        raise NotImplementedError

    def __call__(self, inputs: Any) -> Any:
        """Keras's functional API: call the layer on a symbolic tensor from ``Input`` (or a list of
        them for merges) to get the symbolic output (see ``imclass.models.functional``)."""
        from imclass.models.functional import call_layer

        return call_layer(self, inputs)

    def get_config(self) -> dict[str, Any]:
        """The ``__init__`` arguments as a JSON-able dict (``cls(**config)`` rebuilds the layer)."""
        config: dict[str, Any] = {}
        if self.name is not None:
            config["name"] = self.name
        if self.input_shape is not None:
            config["input_shape"] = list(self.input_shape)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Layer":
        """Rebuild a layer from ``get_config()``."""
        return cls(**config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class Dense(Layer):
    """Fully connected layer ``y = activation(x @ W + b)`` on flat input ``(N, features)``.

    With ``activation="maxout"`` (``k`` pieces) it computes ``units * k`` pre-activations and keeps
    the max of each group of ``k``, so the output still has ``units`` features.
    """

    prefix = "dense"

    def __init__(self, units: int, activation: Any = None, input_dim: int | None = None, use_bias: bool = True,
                 name: str | None = None, input_shape: int | Sequence[int] | None = None):
        if input_dim is not None:
            _check_int("input_dim", input_dim)
            if input_shape is not None and to_channels_first(input_shape) != (input_dim,):
                raise ValueError(f"input_dim={input_dim} and input_shape={input_shape!r} disagree; give one of them")
            input_shape = (input_dim,)
        super().__init__(name, input_shape)
        self.units = _check_int("units", units)
        self.activation = _parse_activation(activation)
        self.use_bias = bool(use_bias)

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        if len(input_shape) != 1:
            raise ValueError(
                f"Dense expects flat input (N, features), received {_fmt(input_shape)} from the previous layer; "
                "add Flatten() (or GlobalAveragePooling2D()) before Dense"
            )
        return (self.units,)

    def build(self, input_shape: Shape) -> list[tuple[str, nn.Module]]:
        self.compute_output_shape(input_shape)
        linear = nn.Linear(input_shape[0], self.units * _width(self.activation), bias=self.use_bias)
        _keras_init(linear)
        return [("", linear), *_activation_modules(self.activation)]

    def get_config(self) -> dict[str, Any]:
        return {"units": self.units, "activation": _activation_config(self.activation),
                "use_bias": self.use_bias, **super().get_config()}


class Conv2D(Layer):
    """2-D convolution on ``(N, C, H, W)``: ``filters`` output channels, ``padding`` "valid" or "same".

    "same" keeps ``ceil(H / stride)`` rows as Keras does (an odd total padding puts the extra
    row/column at the bottom/right, which takes an explicit ``ZeroPad2d``).
    """

    prefix = "conv2d"

    def __init__(self, filters: int, kernel_size: int | Sequence[int], strides: int | Sequence[int] = 1,
                 padding: str = "valid", activation: Any = None, use_bias: bool = True,
                 name: str | None = None, input_shape: int | Sequence[int] | None = None):
        super().__init__(name, input_shape)
        self.filters = _check_int("filters", filters)
        self.kernel_size = _pair("kernel_size", kernel_size)
        self.strides = _pair("strides", strides)
        self.padding = _check_padding(padding)
        self.activation = _parse_activation(activation)
        self.use_bias = bool(use_bias)

    def _pads(self, input_shape: Shape) -> list[tuple[int, int]]:
        # (before, after) padding per spatial dimension
        if self.padding == "valid":
            return [(0, 0), (0, 0)]
        pads = []
        for size, k, s in zip(input_shape[1:], self.kernel_size, self.strides):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        return pads

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        _needs_image("Conv2D", input_shape)
        pads = self._pads(input_shape)
        out = []
        for size, k, s, (p0, p1) in zip(input_shape[1:], self.kernel_size, self.strides, pads):
            if k > size + p0 + p1:
                raise ValueError(
                    f"Conv2D kernel {self.kernel_size} does not fit the input {_fmt(input_shape)}; "
                    "use a smaller kernel or padding='same'"
                )
            out.append((size + p0 + p1 - k) // s + 1)
        return (self.filters, *out)

    def build(self, input_shape: Shape) -> list[tuple[str, nn.Module]]:
        self.compute_output_shape(input_shape)
        (top, bottom), (left, right) = self._pads(input_shape)
        modules: list[tuple[str, nn.Module]] = []
        if top == bottom and left == right:
            padding = (top, left)
        else:
            modules.append(("_pad", nn.ZeroPad2d((left, right, top, bottom))))
            padding = (0, 0)
        conv = nn.Conv2d(input_shape[0], self.filters * _width(self.activation), self.kernel_size,
                         stride=self.strides, padding=padding, bias=self.use_bias)
        _keras_init(conv)
        return [*modules, ("", conv), *_activation_modules(self.activation)]

    def get_config(self) -> dict[str, Any]:
        return {"filters": self.filters, "kernel_size": list(self.kernel_size), "strides": list(self.strides),
                "padding": self.padding, "activation": _activation_config(self.activation),
                "use_bias": self.use_bias, **super().get_config()}


class _Pooling2D(Layer):
    """Shared argument checks and shape arithmetic of the 2-D pooling layers."""

    module: ClassVar[type[nn.Module]]

    def __init__(self, pool_size: int | Sequence[int] = 2, strides: int | Sequence[int] | None = None,
                 padding: str = "valid", name: str | None = None, input_shape: int | Sequence[int] | None = None):
        super().__init__(name, input_shape)
        self.pool_size = _pair("pool_size", pool_size)
        self.strides = self.pool_size if strides is None else _pair("strides", strides)
        if padding != "valid":
            raise ValueError(
                f"expected padding='valid' for {type(self).__name__} (the only one supported), received padding={padding!r}"
            )

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        _needs_image(type(self).__name__, input_shape)
        if any(k > size for k, size in zip(self.pool_size, input_shape[1:])):
            raise ValueError(f"{type(self).__name__} window {self.pool_size} does not fit the input {_fmt(input_shape)}")
        return (input_shape[0], *((size - k) // s + 1 for size, k, s in zip(input_shape[1:], self.pool_size, self.strides)))

    def build(self, input_shape: Shape) -> list[tuple[str, nn.Module]]:
        self.compute_output_shape(input_shape)
        return [("", self.module(self.pool_size, self.strides))]

    def get_config(self) -> dict[str, Any]:
        return {"pool_size": list(self.pool_size), "strides": list(self.strides), **super().get_config()}


class MaxPooling2D(_Pooling2D):
    """Max over each ``pool_size`` window, moving by ``strides`` (default: the window, no overlap)."""

    prefix = "max_pooling2d"
    module = nn.MaxPool2d


class AveragePooling2D(_Pooling2D):
    """Mean over each ``pool_size`` window, moving by ``strides`` (default: the window, no overlap)."""

    prefix = "average_pooling2d"
    module = nn.AvgPool2d


class GlobalAvgPool2d(nn.Module):
    """Mean over all positions: ``(N, C, H, W) -> (N, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class GlobalAveragePooling2D(Layer):
    """Average each channel over the whole image: ``(N, C, H, W) -> (N, C)``."""

    prefix = "global_average_pooling2d"

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        _needs_image("GlobalAveragePooling2D", input_shape)
        return (input_shape[0],)

    def build(self, input_shape: Shape) -> list[tuple[str, nn.Module]]:
        self.compute_output_shape(input_shape)
        return [("", GlobalAvgPool2d())]


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
            raise ValueError(f"BatchNormalization expects (N, features) or (N, C, H, W), received {_fmt(input_shape)}")
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
            raise ValueError(f"maxout with k={k} expects a width divisible by {k}, received {_fmt(input_shape)}")
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


class _Merge(nn.Module):
    """Element-wise sum, or concatenation along ``dim``, of several tensors."""

    def __init__(self, dim: int | None = None):
        super().__init__()
        self.dim = dim

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        if self.dim is None:
            out = xs[0]
            for x in xs[1:]:
                out = out + x
            return out
        return torch.cat(xs, dim=self.dim)

    def extra_repr(self) -> str:
        return "sum" if self.dim is None else f"cat dim={self.dim}"


class _MergeLayer(Layer):
    """A layer of several inputs (functional API only): ``Add()([x, y])``."""

    multi_input: ClassVar[bool] = True

    def _check_many(self, input_shape: Any) -> list[Shape]:
        if not isinstance(input_shape, list) or len(input_shape) < 2:
            raise ValueError(f"{type(self).__name__} merges several tensors: use it in the functional API, "
                             f"e.g. {type(self).__name__}()([x, y]), not in a Sequential")
        return input_shape


class Add(_MergeLayer):
    """Element-wise sum of tensors of one shape (residual connections): ``Add()([x, y])``."""

    prefix = "add"

    def compute_output_shape(self, input_shape: Any) -> Shape:
        shapes = self._check_many(input_shape)
        if any(s != shapes[0] for s in shapes):
            raise ValueError(f"Add expects inputs of one shape, received {', '.join(_fmt(s) for s in shapes)}")
        return shapes[0]

    def build(self, input_shape: Any) -> list[tuple[str, nn.Module]]:
        self.compute_output_shape(input_shape)
        return [("", _Merge())]


class Concatenate(_MergeLayer):
    """Join tensors along ``axis`` in Keras's channels-last numbering: the default ``-1`` is the
    channels of images (dimension 1 of ``(N, C, H, W)``) or the features of flat tensors."""

    prefix = "concatenate"

    def __init__(self, axis: int = -1, name: str | None = None, input_shape: int | Sequence[int] | None = None):
        super().__init__(name, input_shape)
        if not _is_int(axis, low=-4) or axis == 0:
            raise ValueError(f"expected axis -1 (channels), 1, 2 or 3 (Keras numbering, 0 is the batch), received axis={axis!r}")
        self.axis = int(axis)

    def _dim(self, rank: int) -> int:
        # Keras (N, H, W, C) axis -> torch (N, C, H, W) dimension; flat (N, F): 1
        axis = self.axis if self.axis > 0 else rank + 1 + self.axis
        if not 1 <= axis <= rank:
            raise ValueError(f"Concatenate axis={self.axis} does not exist for inputs of rank {rank} (without batch)")
        return {1: 2, 2: 3, 3: 1}[axis] if rank == 3 else axis

    def compute_output_shape(self, input_shape: Any) -> Shape:
        shapes = self._check_many(input_shape)
        if len({len(s) for s in shapes}) != 1:
            raise ValueError(f"Concatenate expects inputs of one rank, received {', '.join(_fmt(s) for s in shapes)}")
        dim = self._dim(len(shapes[0])) - 1
        rest = [s[:dim] + s[dim + 1:] for s in shapes]
        if any(r != rest[0] for r in rest):
            raise ValueError(f"Concatenate axis={self.axis} expects inputs equal in the other dimensions, received "
                             f"{', '.join(_fmt(s) for s in shapes)}")
        out = list(shapes[0])
        out[dim] = sum(s[dim] for s in shapes)
        return tuple(out)

    def build(self, input_shape: Any) -> list[tuple[str, nn.Module]]:
        self.compute_output_shape(input_shape)
        return [("", _Merge(self._dim(len(input_shape[0]))))]

    def get_config(self) -> dict[str, Any]:
        return {"axis": self.axis, **super().get_config()}


class ModelLayer(Layer):
    """A Keras-style model (``Sequential``, functional ``Model``, an application) used as one layer of
    another model, sharing its weights: ``Sequential([ResNet50(include_top=False, ...), Flatten(), ...])``."""

    prefix = "model"
    _model_classes: ClassVar[dict[str, type]] = {}

    @classmethod
    def register_model_class(cls, name: str, model_cls: type) -> None:
        """Make ``from_config`` able to rebuild models of ``model_cls`` (class name ``name``)."""
        cls._model_classes[name] = model_cls

    def __init__(self, model: nn.Module, name: str | None = None, input_shape: int | Sequence[int] | None = None):
        if not isinstance(model, nn.Module) or not hasattr(model, "get_config") or getattr(model, "input_shape", None) is None:
            raise TypeError(f"expected a Keras-style model (Sequential, Model or an application) with an input shape, "
                            f"received {type(model).__name__}")
        model_name = getattr(model, "name", None)
        if name is None and isinstance(model_name, str) and model_name.isidentifier():
            name = model_name
        super().__init__(name, input_shape)
        if self.input_shape is None:
            self.input_shape = tuple(model.input_shape)  # already channels-first
        self.model = model

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        if tuple(input_shape) != tuple(self.model.input_shape):
            raise ValueError(f"the model {self.name or type(self.model).__name__!r} takes input {_fmt(self.model.input_shape)}, "
                             f"received {_fmt(input_shape)}")
        return tuple(self.model.output_shape)

    def build(self, input_shape: Shape) -> list[tuple[str, nn.Module]]:
        self.compute_output_shape(input_shape)
        # the inner model's forward leaves its final softmax/sigmoid to the loss; inside a bigger model it applies
        final = getattr(self.model, "final_activation", None)
        return [("", self.model), *_activation_modules((final, {}) if final else None)]

    def get_config(self) -> dict[str, Any]:
        return {"model": {"class_name": type(self.model).__name__, "config": self.model.get_config()},
                **super().get_config()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelLayer":
        config = dict(config)
        entry = config.pop("model")
        if entry["class_name"] not in cls._model_classes:
            import imclass.models.functional  # noqa: F401  (registers Model)
        if entry["class_name"] not in cls._model_classes:
            raise ValueError(f"unknown model class {entry['class_name']!r} in config; known: {sorted(cls._model_classes)}")
        return cls(cls._model_classes[entry["class_name"]].from_config(entry["config"]), **config)


class _LayerNames:
    """Module-name prefixes for the layers of one model: the layer's ``name``, else its Keras prefix
    numbered (``conv2d``, ``conv2d_1``, ...)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def assign(self, layer: Layer, modules: Any) -> str:
        if layer.name is not None:
            if layer.name in self.used or layer.name in modules:
                raise ValueError(f"layer name {layer.name!r} is used twice in this model")
            self.used.add(layer.name)
            return layer.name
        name, i = layer.prefix, 0
        while name in self.used or name in modules:
            i += 1
            name = f"{layer.prefix}_{i}"
        self.used.add(name)
        return name


def final_activation_of(modules: list[tuple[str, nn.Module]], output_shape: Shape) -> str | None:
    """``"softmax"`` when the last module is a softmax, ``"sigmoid"`` when it is the sigmoid of a
    one-unit output (binary classification); such a final activation is left to the loss."""
    last = modules[-1][1] if modules else None
    if isinstance(last, nn.Softmax):
        return "softmax"
    if isinstance(last, nn.Sigmoid) and tuple(output_shape) == (1,):
        return "sigmoid"
    return None


def adapt_flat_input(x: torch.Tensor, expected: Shape) -> torch.Tensor:
    """Flat features reach a model as ``(N, F)``, or as ``(N, 1, 1, F)`` one-row grey images (the
    form in which the image-based engine carries them, see ``imclass.train.keras``)."""
    if len(expected) == 1 and x.ndim == 4 and tuple(x.shape[1:]) == (1, 1, expected[0]):
        return x.flatten(1)
    return x


def Input(shape: int | Sequence[int] | None = None, batch_size: int | None = None, name: str | None = None,
          dtype: Any = None) -> Any:
    """Keras's ``Input``: a symbolic model input (see :func:`imclass.models.functional.Input`)."""
    from imclass.models.functional import Input as _Input

    return _Input(shape, batch_size=batch_size, name=name, dtype=dtype)


# ----------------------------------------------------------------------------- Keras's model methods


class KerasModel:
    """Keras's model methods on ``Sequential`` and ``Model``, all delegating to ``imclass.Classifier``
    (the one engine; see ``imclass.train.keras`` for how data and labels are converted)."""

    def compile(self, optimizer: Any = "rmsprop", loss: Any = None, metrics: Sequence[Any] | None = None,
                **options: Any) -> None:
        """Keras's ``compile``: an optimizer (name or ``imclass.optimizers`` object), a loss (name or
        ``imclass.losses`` object) and ``metrics`` (``["accuracy"]``). Other ``options`` go to
        ``Classifier.compile`` (``label_smoothing``, ``amp``, ...); ``mean``/``std`` set the input
        normalisation (default: none beyond uint8 / 255, as Keras)."""
        from imclass.train.keras import compile_model

        compile_model(self, optimizer, loss, metrics, **options)

    def fit(self, x: Any = None, y: Any = None, batch_size: int | None = None, epochs: int = 1, verbose: Any = "auto",
            callbacks: Sequence[Any] | None = None, validation_split: float = 0.0, validation_data: Any = None,
            shuffle: bool = True, **options: Any) -> Any:
        """Keras's ``fit`` on numpy arrays or tensors (channels-last or -first, uint8 or float / 255;
        labels as the loss expects). Returns the ``History`` (``history.history["loss"]``)."""
        from imclass.train.keras import fit_model

        return fit_model(self, x, y, batch_size=batch_size, epochs=epochs, verbose=verbose, callbacks=callbacks,
                         validation_split=validation_split, validation_data=validation_data, shuffle=shuffle,
                         **options)

    def evaluate(self, x: Any = None, y: Any = None, batch_size: int | None = None, verbose: Any = "auto",
                 return_dict: bool = False) -> Any:
        """Keras's ``evaluate``: the loss, or ``[loss, accuracy]`` when ``metrics=["accuracy"]`` was compiled."""
        from imclass.train.keras import evaluate_model

        return evaluate_model(self, x, y, batch_size=batch_size, verbose=verbose, return_dict=return_dict)

    def predict(self, x: Any, batch_size: int | None = None, verbose: Any = 0) -> Any:
        """Keras's ``predict``: the model's outputs as numpy, the final softmax/sigmoid applied
        (class probabilities); ``predict(x).argmax(1)`` gives the classes."""
        from imclass.train.keras import predict_model

        return predict_model(self, x, batch_size=batch_size)

    def summary(self, print_fn: Any = None) -> int:
        """Print the table of layers, output shapes and parameter counts; returns the parameter count."""
        from imclass.summarize import summary

        return summary(self, self.input_shape, print_fn=print_fn or print)

    def save(self, filepath: Any) -> Any:
        """Write one imclass model file (``.safetensors``: weights, architecture, and once trained the
        classes, normalisation and training config); ``imclass.models.load_model`` reads it back."""
        from imclass.train.keras import save_model

        return save_model(self, filepath)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # a symbolic tensor (functional API): the whole model becomes one layer of a bigger graph
        first = args[0] if args else None
        if type(first).__name__ == "KerasTensor" or (isinstance(first, (list, tuple)) and first
                                                      and type(first[0]).__name__ == "KerasTensor"):
            return ModelLayer(self)(first)
        return nn.Module.__call__(self, *args, **kwargs)

    @property
    def classifier(self) -> Any:
        """The ``imclass.Classifier`` that ``compile`` made (``None`` before)."""
        state = self.__dict__.get("_keras_state")
        return state.classifier if state is not None else None


def _keras_init(module: nn.Linear | nn.Conv2d) -> None:
    # Keras defaults: Glorot-uniform kernel, zero bias (the course's models were trained this way).
    nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- Sequential


class Sequential(KerasModel, nn.Module):
    """A stack of course layers built into torch modules, with every shape inferred.

    The input shape comes from ``input_shape=`` here or on the first layer (``input_dim=`` for a
    first ``Dense``); channels-last ``(32, 32, 3)`` becomes ``(3, 32, 32)``. ``forward`` takes
    ``(N, *input_shape)`` float tensors and returns logits: a final ``softmax`` is not applied and
    ``final_activation`` says ``"softmax"`` instead (the loss and ``predict_proba`` use it).

    ``forward_features`` runs everything before the last ``Dense`` (the classifier),
    ``forward_head`` the classifier itself; ``get_config()``/``from_config`` rebuild the same
    architecture, with the same ``state_dict`` keys.
    """

    def __init__(self, layers: Iterable[Layer] = (), input_shape: int | Sequence[int] | None = None,
                 name: str | None = None):
        nn.Module.__init__(self)
        self.name = name or "sequential"
        self._symbolic: tuple[Any, Any] | None = None  # (input, output) KerasTensors, made on first use
        self.input_shape: Shape | None = None if input_shape is None else to_channels_first(input_shape)
        self.layers: list[Layer] = []
        self._names: list[str] = []  # one module-name prefix per layer
        self._modules_of: list[list[str]] = []  # module names built for each layer
        self._shapes: list[Shape] = []  # output shape after each layer
        for layer in layers:
            self.add(layer)

    # -- building

    @property
    def output_shape(self) -> Shape:
        """The shape (without batch) of the last layer's output (of the input when empty)."""
        if self._shapes:
            return self._shapes[-1]
        if self.input_shape is None:
            raise ValueError("this Sequential has no input shape yet")
        return self.input_shape

    def add(self, layer: Layer) -> "Sequential":
        """Append a layer, building its modules for the current output shape.

        Also accepted: ``Input(shape=...)`` first (it sets the input shape), and a Keras-style model
        (another Sequential, a functional ``Model`` or an application), added as one layer."""
        if type(layer).__name__ == "KerasTensor" and layer.node.layer is None:  # Input(shape=...)
            if self.layers:
                raise ValueError("Input(...) must come first in a Sequential")
            self.input_shape = layer.shape
            return self
        if isinstance(layer, nn.Module) and hasattr(layer, "get_config") and hasattr(layer, "input_shape"):
            layer = ModelLayer(layer)
        if not isinstance(layer, Layer):
            raise TypeError(
                f"expected a layer such as Dense(...) or Conv2D(...), received {type(layer).__name__}; "
                "wrap plain torch modules in your own nn.Module instead"
            )
        if layer.input_shape is not None:
            if self.input_shape is None:
                self.input_shape = layer.input_shape
            elif layer.input_shape != self.output_shape:
                where = "model input" if not self.layers else "previous layer's output"
                raise ValueError(
                    f"{type(layer).__name__} was given input shape {_fmt(layer.input_shape)} but the {where} "
                    f"is {_fmt(self.output_shape)}"
                )
        if self.input_shape is None:
            raise ValueError(
                "Sequential needs the input shape: pass input_shape=(32, 32, 3) to Sequential or to the first "
                "layer (input_dim=... for a first Dense)"
            )
        self._symbolic = None
        in_shape = self.output_shape
        out_shape = layer.compute_output_shape(in_shape)
        name = self._unique_name(layer)
        built = []
        for suffix, module in layer.build(in_shape):
            self.add_module(name + suffix, module)
            built.append(name + suffix)
        self.layers.append(layer)
        self._names.append(name)
        self._modules_of.append(built)
        self._shapes.append(out_shape)
        return self

    def _unique_name(self, layer: Layer) -> str:
        if layer.name is not None:
            if layer.name in self._names or layer.name in self._modules:
                raise ValueError(f"layer name {layer.name!r} is used twice in this model")
            return layer.name
        name, i = layer.prefix, 0
        while name in self._names or name in self._modules:
            i += 1
            name = f"{layer.prefix}_{i}"
        return name

    def pop(self) -> Layer:
        """Remove the last layer (and its modules); return it."""
        if not self.layers:
            raise ValueError("cannot pop from an empty Sequential")
        self._symbolic = None
        for module_name in self._modules_of.pop():
            delattr(self, module_name)
        self._names.pop()
        self._shapes.pop()
        return self.layers.pop()

    # -- running

    @property
    def input(self) -> Any:
        """The symbolic input (Keras's ``model.input``), to attach layers through the functional API."""
        return self._graph()[0]

    @property
    def output(self) -> Any:
        """The symbolic output (Keras's ``model.output``): ``Model(model.input, Dense(10)(model.output))``."""
        return self._graph()[1]

    def _graph(self) -> tuple[Any, Any]:
        if self._symbolic is None:
            from imclass.models.functional import Input as _Input, call_layer

            if self.input_shape is None:
                raise ValueError("this Sequential has no input shape yet")
            x = _Input(shape=self.input_shape)
            self._symbolic = (x, call_layer(ModelLayer(self), x))
        return self._symbolic

    @property
    def final_activation(self) -> str | None:
        """``"softmax"`` (or ``"sigmoid"`` of a one-unit output) when the model ends with it; ``forward`` leaves it out."""
        last = list(self._modules.items())[-1:] if self._modules else []
        return final_activation_of(last, self.output_shape) if last else None

    @final_activation.setter
    def final_activation(self, value: str | None) -> None:
        # The layers decide it; accept a caller restating it (e.g. a loader copying a model file's value).
        if value != self.final_activation:
            raise ValueError(
                f"this Sequential's final activation is {self.final_activation!r} (set by its last layer), "
                f"received {value!r}"
            )

    def _classifier_index(self) -> int | None:
        for i in range(len(self.layers) - 1, -1, -1):
            if isinstance(self.layers[i], Dense):
                return i
        return None

    def _split(self) -> tuple[list[nn.Module], list[nn.Module]]:
        modules = list(self._modules.values())
        if self.final_activation:
            modules = modules[:-1]
        i = self._classifier_index()
        if i is None:
            return modules, []
        start = list(self._modules).index(self._names[i])  # the classifier's Linear
        return modules[:start], modules[start:]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the classifier (the last Dense): the features it sees."""
        x = adapt_flat_input(x, self.input_shape or ())
        self._check_input(x)
        for module in self._split()[0]:
            x = module(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The classifier (last Dense and what follows, except a final softmax); ``pre_logits`` skips it."""
        if pre_logits:
            return x
        for module in self._split()[1]:
            x = module(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a float ``(N, *input_shape)`` batch."""
        return self.forward_head(self.forward_features(x))

    def _check_input(self, x: torch.Tensor) -> None:
        expected = self.input_shape
        if expected is None:
            raise ValueError("this Sequential has no layers yet")
        received = tuple(x.shape[1:])
        if received == expected:
            return
        message = f"expected input of shape {_fmt(expected)}, received {_fmt(received)}"
        if len(expected) == 3 and len(received) == 3 and received == (expected[1], expected[2], expected[0]):
            message += "; the model takes channels-first images (N, C, H, W): use x.permute(0, 3, 1, 2)"
        elif len(expected) == 1 and len(received) > 1 and math.prod(received) == expected[0]:
            message += "; flatten the input first (x.flatten(1)) or start the model with Flatten()"
        raise ValueError(message)

    # -- classifier (timm's contract)

    def get_classifier(self) -> nn.Module:
        """The last Dense's linear module (``nn.Identity()`` when the model has no Dense)."""
        i = self._classifier_index()
        return nn.Identity() if i is None else getattr(self, self._names[i])

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the last Dense by a fresh one with ``num_classes`` outputs (same activation)."""
        _check_int("num_classes", num_classes)
        i = self._classifier_index()
        if i is None:
            raise ValueError("this model has no Dense layer to use as its classifier")
        name = self._names[i]
        tail = [self.pop() for _ in range(len(self.layers) - i)][::-1]  # the old Dense and what follows it
        config = {**tail[0].get_config(), "units": num_classes, "name": name}
        config.pop("input_shape", None)
        self.add(Dense(**config))
        for layer in tail[1:]:
            self.add(layer)

    # -- configuration

    def get_config(self) -> dict[str, Any]:
        """A JSON-able description: the input shape and each layer's class and arguments."""
        layers = []
        for layer, name in zip(self.layers, self._names):
            config = layer.get_config()
            config.pop("input_shape", None)
            config["name"] = name
            layers.append({"class_name": type(layer).__name__, "config": config})
        config = {"class_name": "Sequential", "input_shape": list(self.input_shape or ()), "layers": layers}
        if self.name != "sequential":
            config["name"] = self.name
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Sequential":
        """Rebuild the architecture described by ``get_config()`` (its ``state_dict`` loads as is)."""
        if not isinstance(config, dict) or "layers" not in config or "input_shape" not in config:
            raise ValueError(f"expected a Sequential config with 'input_shape' and 'layers', received {config!r:.200}")
        layers = []
        for entry in config["layers"]:
            name = entry.get("class_name") if isinstance(entry, dict) else None
            if name not in _LAYERS:
                import imclass.applications  # noqa: F401  (registers its layer classes)
            if name not in _LAYERS or name.startswith("_"):
                known = sorted(n for n in _LAYERS if not n.startswith("_"))
                raise ValueError(f"unknown layer class {name!r} in config; known: {known}")
            layers.append(_LAYERS[name].from_config(dict(entry.get("config", {}))))
        return cls(layers, input_shape=tuple(config["input_shape"]), name=config.get("name"))


ModelLayer.register_model_class("Sequential", Sequential)
