"""The symbolic graph of Keras's functional API, below the layers (as in Keras 3): ``KerasTensor``,
``Node``, ``Input`` and ``call_layer``.

A :class:`KerasTensor` holds no data: only its shape (channels-first, without the batch) and the
:class:`Node` that made it. Calling a layer on one checks and infers the shape and builds the
layer's torch modules right away; a layer called twice reuses its modules (shared weights, as in
Keras). ``imclass.models.functional.Model`` collects the modules between an input and an output.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch.nn as nn

from imclass.nn.shapes import Shape, format_shape, to_channels_first

if TYPE_CHECKING:
    from imclass.nn.layer import Layer

__all__ = ["Input", "KerasTensor", "Node", "as_tensor_list", "call_layer", "graph_nodes", "is_symbolic"]


class Node:
    """One call of a layer: its input tensors, the torch modules it built and its output tensor."""

    def __init__(self, layer: Layer | None, inputs: list["KerasTensor"], modules: list[tuple[str, nn.Module]],
                 shape: Shape, name: str | None = None) -> None:
        self.layer = layer  # None for an Input
        self.inputs = inputs
        self.modules = modules
        self.output = KerasTensor(shape, self)
        self.name = name  # an Input's name

    @property
    def multi_input(self) -> bool:
        return bool(getattr(self.layer, "multi_input", False))


class KerasTensor:
    """A symbolic tensor: the shape of one example (channels-first ``(C, H, W)`` or ``(features,)``)."""

    def __init__(self, shape: Shape, node: Node) -> None:
        self.shape = tuple(shape)
        self.node = node

    @property
    def keras_shape(self) -> tuple[int | None, ...]:
        """The shape as Keras prints it: batch ``None`` first, channels last."""
        if len(self.shape) == 3:
            return (None, self.shape[1], self.shape[2], self.shape[0])
        return (None, *self.shape)

    def __repr__(self) -> str:
        made_by = "Input" if self.node.layer is None else type(self.node.layer).__name__
        return f"<KerasTensor shape={format_shape(self.shape)} from {made_by}>"


def Input(shape: int | Sequence[int] | None = None, batch_size: int | None = None, name: str | None = None,
          dtype: Any = None) -> KerasTensor:
    """A symbolic model input of ``shape`` (one example, without the batch; channels-last ``(32, 32, 3)``
    as Keras writes it, or channels-first)."""
    if shape is None:
        raise ValueError("Input needs shape=, e.g. Input(shape=(32, 32, 3)) or Input(shape=(784,))")
    if name is not None and (not isinstance(name, str) or not name.isidentifier()):
        raise ValueError(f"expected an input name made of letters, digits and '_', received name={name!r}")
    return Node(None, [], [], to_channels_first(shape), name=name).output


def as_tensor_list(inputs: Any, what: str) -> list[KerasTensor]:
    """``inputs`` (one ``KerasTensor`` or a list of them) as a list; anything else is a ``TypeError``
    naming ``what``."""
    items = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    for item in items:
        if not isinstance(item, KerasTensor):
            raise TypeError(
                f"expected {what} as symbolic tensors from Input(...) or from calling a layer, received "
                f"{type(item).__name__}"
            )
    return items


def call_layer(layer: Layer, inputs: Any) -> KerasTensor:
    """``layer(inputs)`` on symbolic tensors: infer the output shape, build (or reuse) the modules."""
    multi = bool(getattr(layer, "multi_input", False))
    tensors = as_tensor_list(inputs, f"the inputs of {type(layer).__name__}")
    if multi and (not isinstance(inputs, (list, tuple)) or len(tensors) < 2):
        raise ValueError(f"{type(layer).__name__} merges several tensors: call it on a list, e.g. "
                         f"{type(layer).__name__}()([x, y])")
    if not multi and len(tensors) != 1:
        raise ValueError(f"{type(layer).__name__} takes one input tensor, received {len(tensors)}")
    shapes = [t.shape for t in tensors]
    in_shape: Any = shapes if multi else shapes[0]
    if not multi and layer.input_shape is not None and layer.input_shape != in_shape:
        raise ValueError(f"{type(layer).__name__} was given input shape {format_shape(layer.input_shape)} but is called on "
                         f"a tensor of shape {format_shape(in_shape)}")
    built = getattr(layer, "built_for", None)  # declared by Layer.__init__
    if built is not None:
        if built[0] != in_shape:
            raise ValueError(
                f"{type(layer).__name__} was first called on shape {format_shape(built[0]) if not multi else built[0]} and "
                f"shares its weights; received shape {format_shape(in_shape) if not multi else in_shape}: use a new layer"
            )
        modules, out_shape = built[1], built[2]
    else:
        out_shape = layer.compute_output_shape(in_shape)
        modules = layer.build(in_shape)
        layer.built_for = (in_shape, modules, out_shape)
    return Node(layer, tensors, modules, out_shape).output


def graph_nodes(inputs: list[KerasTensor], output: KerasTensor) -> list[Node]:
    """The nodes between ``inputs`` and ``output`` in an order where each follows its inputs."""
    order: list[Node] = []
    state: dict[int, str] = {}
    input_nodes = {id(t.node) for t in inputs}

    def visit(node: Node) -> None:
        key = id(node)
        if state.get(key) == "done":
            return
        if node.layer is None and key not in input_nodes:
            name = f" {node.name!r}" if node.name else ""
            raise ValueError(
                f"the output depends on an Input{name} of shape {format_shape(node.output.shape)} that is not among the "
                "model's inputs: pass it in inputs="
            )
        state[key] = "visiting"
        for t in node.inputs:
            visit(t.node)
        state[key] = "done"
        order.append(node)

    visit(output.node)
    used = {id(n) for n in order}
    for t in inputs:
        if id(t.node) not in used:
            raise ValueError(f"the input of shape {format_shape(t.shape)} is not used to compute the output")
    return order



def is_symbolic(x: Any) -> bool:
    """True for a ``KerasTensor`` or a non-empty list/tuple starting with one (functional API calls)."""
    return isinstance(x, KerasTensor) or (isinstance(x, (list, tuple)) and bool(x) and isinstance(x[0], KerasTensor))
