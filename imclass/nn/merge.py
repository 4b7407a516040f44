"""Layers of several inputs (functional API): ``Add`` and ``Concatenate``."""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
import torch.nn as nn

from imclass.nn.layer import Layer
from imclass.nn.shapes import Shape, format_shape, is_int

__all__ = ["Add", "Concatenate", "Merge", "MergeLayer"]


class Merge(nn.Module):
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


class MergeLayer(Layer):
    """A layer of several inputs (functional API only): ``Add()([x, y])``."""

    multi_input: ClassVar[bool] = True

    def _check_many(self, input_shape: Any) -> list[Shape]:
        if not isinstance(input_shape, list) or len(input_shape) < 2:
            raise ValueError(f"{type(self).__name__} merges several tensors: use it in the functional API, "
                             f"e.g. {type(self).__name__}()([x, y]), not in a Sequential")
        return input_shape


class Add(MergeLayer):
    """Element-wise sum of tensors of one shape (residual connections): ``Add()([x, y])``."""

    prefix = "add"

    def compute_output_shape(self, input_shape: Any) -> Shape:
        shapes = self._check_many(input_shape)
        if any(s != shapes[0] for s in shapes):
            raise ValueError(f"Add expects inputs of one shape, received {', '.join(format_shape(s) for s in shapes)}")
        return shapes[0]

    def build(self, input_shape: Any) -> list[tuple[str, nn.Module]]:
        self.compute_output_shape(input_shape)
        return [("", Merge())]


class Concatenate(MergeLayer):
    """Join tensors along ``axis`` in Keras's channels-last numbering: the default ``-1`` is the
    channels of images (dimension 1 of ``(N, C, H, W)``) or the features of flat tensors."""

    prefix = "concatenate"

    def __init__(self, axis: int = -1, name: str | None = None, input_shape: int | Sequence[int] | None = None):
        super().__init__(name, input_shape)
        if not is_int(axis, low=-4) or axis == 0:
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
            raise ValueError(f"Concatenate expects inputs of one rank, received {', '.join(format_shape(s) for s in shapes)}")
        dim = self._dim(len(shapes[0])) - 1
        rest = [s[:dim] + s[dim + 1:] for s in shapes]
        if any(r != rest[0] for r in rest):
            raise ValueError(f"Concatenate axis={self.axis} expects inputs equal in the other dimensions, received "
                             f"{', '.join(format_shape(s) for s in shapes)}")
        out = list(shapes[0])
        out[dim] = sum(s[dim] for s in shapes)
        return tuple(out)

    def build(self, input_shape: Any) -> list[tuple[str, nn.Module]]:
        self.compute_output_shape(input_shape)
        return [("", Merge(self._dim(len(input_shape[0]))))]

    def get_config(self) -> dict[str, Any]:
        return {"axis": self.axis, **super().get_config()}
