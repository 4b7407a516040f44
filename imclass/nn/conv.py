"""The course's image layers: ``Conv2D``, ``MaxPooling2D``, ``AveragePooling2D``,
``GlobalAveragePooling2D`` (and its torch module ``SpatialMean``)."""
from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn

from imclass.nn.core import activation_config, activation_modules, activation_width, parse_activation
from imclass.nn.layer import Layer, keras_init
from imclass.nn.shapes import Shape, check_int, check_padding, format_shape, int_pair, needs_image

__all__ = ["AveragePooling2D", "Conv2D", "GlobalAvgPool2d", "GlobalAveragePooling2D", "MaxPooling2D", "SpatialMean"]


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
        self.filters = check_int("filters", filters)
        self.kernel_size = int_pair("kernel_size", kernel_size)
        self.strides = int_pair("strides", strides)
        self.padding = check_padding(padding)
        self.activation = parse_activation(activation)
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
        needs_image("Conv2D", input_shape)
        pads = self._pads(input_shape)
        out = []
        for size, k, s, (p0, p1) in zip(input_shape[1:], self.kernel_size, self.strides, pads):
            if k > size + p0 + p1:
                raise ValueError(
                    f"Conv2D kernel {self.kernel_size} does not fit the input {format_shape(input_shape)}; "
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
        conv = nn.Conv2d(input_shape[0], self.filters * activation_width(self.activation), self.kernel_size,
                         stride=self.strides, padding=padding, bias=self.use_bias)
        keras_init(conv)
        return [*modules, ("", conv), *activation_modules(self.activation)]

    def get_config(self) -> dict[str, Any]:
        return {"filters": self.filters, "kernel_size": list(self.kernel_size), "strides": list(self.strides),
                "padding": self.padding, "activation": activation_config(self.activation),
                "use_bias": self.use_bias, **super().get_config()}


class _Pooling2D(Layer):
    """Shared argument checks and shape arithmetic of the 2-D pooling layers."""

    module: ClassVar[type[nn.Module]]

    def __init__(self, pool_size: int | Sequence[int] = 2, strides: int | Sequence[int] | None = None,
                 padding: str = "valid", name: str | None = None, input_shape: int | Sequence[int] | None = None):
        super().__init__(name, input_shape)
        self.pool_size = int_pair("pool_size", pool_size)
        self.strides = self.pool_size if strides is None else int_pair("strides", strides)
        if padding != "valid":
            raise ValueError(
                f"expected padding='valid' for {type(self).__name__} (the only one supported), received padding={padding!r}"
            )

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        needs_image(type(self).__name__, input_shape)
        if any(k > size for k, size in zip(self.pool_size, input_shape[1:])):
            raise ValueError(f"{type(self).__name__} window {self.pool_size} does not fit the input {format_shape(input_shape)}")
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


class SpatialMean(nn.Module):
    """Mean over all positions: ``(N, C, H, W) -> (N, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


class GlobalAveragePooling2D(Layer):
    """Average each channel over the whole image: ``(N, C, H, W) -> (N, C)``."""

    prefix = "global_average_pooling2d"

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        needs_image("GlobalAveragePooling2D", input_shape)
        return (input_shape[0],)

    def build(self, input_shape: Shape) -> list[tuple[str, nn.Module]]:
        self.compute_output_shape(input_shape)
        return [("", SpatialMean())]



GlobalAvgPool2d = SpatialMean  # the former name of the torch module
