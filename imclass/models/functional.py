"""Keras's functional API: ``Input``, layers called on symbolic tensors, ``Model(inputs, outputs)``.

    from imclass.layers import Add, Conv2D, Dense, GlobalAveragePooling2D
    from imclass.models import Input, Model

    x = Input(shape=(32, 32, 3))
    y = Conv2D(16, 3, padding="same", activation="relu")(x)
    z = Conv2D(16, 3, padding="same")(y)
    z = Add()([y, z])                                   # a residual connection
    out = Dense(10, activation="softmax")(GlobalAveragePooling2D()(z))
    model = Model(inputs=x, outputs=out)                # a plain torch.nn.Module

A :class:`KerasTensor` holds no data: only its shape (channels-first, without the batch) and the
:class:`Node` that made it. Calling a layer on one checks and infers the shape and builds the
layer's torch modules right away (so sizes are never written by hand, as in ``Sequential``); a
layer called twice reuses its modules (shared weights, as in Keras). ``Model`` collects the modules
between its input and output into one ``nn.Module`` whose ``forward`` runs the graph. Like
``Sequential`` it returns logits: a final softmax (or the sigmoid of a one-unit output) is recorded
in ``final_activation``, not applied.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn

from imclass.layers import (
    _LAYERS,
    Dense,
    KerasModel,
    Layer,
    ModelLayer,
    Shape,
    _fmt,
    _LayerNames,
    adapt_flat_input,
    final_activation_of,
    to_channels_first,
)

__all__ = ["Input", "KerasTensor", "Model", "Node"]


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
        return f"<KerasTensor shape={_fmt(self.shape)} from {made_by}>"


def Input(shape: int | Sequence[int] | None = None, batch_size: int | None = None, name: str | None = None,
          dtype: Any = None) -> KerasTensor:
    """A symbolic model input of ``shape`` (one example, without the batch; channels-last ``(32, 32, 3)``
    as Keras writes it, or channels-first)."""
    if shape is None:
        raise ValueError("Input needs shape=, e.g. Input(shape=(32, 32, 3)) or Input(shape=(784,))")
    if name is not None and (not isinstance(name, str) or not name.isidentifier()):
        raise ValueError(f"expected an input name made of letters, digits and '_', received name={name!r}")
    return Node(None, [], [], to_channels_first(shape), name=name).output


def _as_tensor_list(inputs: Any, what: str) -> list[KerasTensor]:
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
    tensors = _as_tensor_list(inputs, f"the inputs of {type(layer).__name__}")
    if multi and (not isinstance(inputs, (list, tuple)) or len(tensors) < 2):
        raise ValueError(f"{type(layer).__name__} merges several tensors: call it on a list, e.g. "
                         f"{type(layer).__name__}()([x, y])")
    if not multi and len(tensors) != 1:
        raise ValueError(f"{type(layer).__name__} takes one input tensor, received {len(tensors)}")
    shapes = [t.shape for t in tensors]
    in_shape: Any = shapes if multi else shapes[0]
    if not multi and layer.input_shape is not None and layer.input_shape != in_shape:
        raise ValueError(f"{type(layer).__name__} was given input shape {_fmt(layer.input_shape)} but is called on "
                         f"a tensor of shape {_fmt(in_shape)}")
    built = getattr(layer, "_functional_built", None)
    if built is not None:
        if built[0] != in_shape:
            raise ValueError(
                f"{type(layer).__name__} was first called on shape {_fmt(built[0]) if not multi else built[0]} and "
                f"shares its weights; received shape {_fmt(in_shape) if not multi else in_shape}: use a new layer"
            )
        modules, out_shape = built[1], built[2]
    else:
        out_shape = layer.compute_output_shape(in_shape)
        modules = layer.build(in_shape)
        layer._functional_built = (in_shape, modules, out_shape)
    return Node(layer, tensors, modules, out_shape).output


def _graph(inputs: list[KerasTensor], output: KerasTensor) -> list[Node]:
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
                f"the output depends on an Input{name} of shape {_fmt(node.output.shape)} that is not among the "
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
            raise ValueError(f"the input of shape {_fmt(t.shape)} is not used to compute the output")
    return order


class Model(KerasModel, nn.Module):
    """A model from a graph of layers: ``Model(inputs=x, outputs=y)`` with ``x`` from ``Input`` (or
    another model's ``input``) and ``y`` from calling layers on it. One input, one output.

    ``forward`` takes float ``(N, *input_shape)`` (channels-first images) and returns logits;
    ``compile`` / ``fit`` / ``evaluate`` / ``predict`` / ``summary`` / ``save`` work as in Keras
    (on ``imclass.Classifier``); ``get_config`` / ``from_config`` rebuild the same architecture with
    the same ``state_dict`` keys (model files use them).
    """

    def __init__(self, inputs: Any = None, outputs: Any = None, name: str | None = None) -> None:
        nn.Module.__init__(self)
        ins = _as_tensor_list(inputs, "inputs")
        outs = _as_tensor_list(outputs, "outputs")
        if len(ins) != 1 or len(outs) != 1:
            raise ValueError(f"Model takes one input and one output (images -> class scores), received "
                             f"{len(ins)} inputs and {len(outs)} outputs")
        self.name = name or "model"
        self._input, self._output = ins[0], outs[0]
        self.input_shape: Shape = ins[0].shape
        self.output_shape: Shape = outs[0].shape
        self._nodes = [n for n in _graph(ins, outs[0]) if n.layer is not None]
        self._node_names: list[str] = []
        names = _LayerNames()
        taken: dict[int, str] = {}  # id(layer) -> its module prefix (a shared layer registers once)
        for node in self._nodes:
            key = id(node.layer)
            if key not in taken:
                taken[key] = names.assign(node.layer, self._modules)
                for suffix, module in node.modules:
                    self.add_module(taken[key] + suffix, module)
            self._node_names.append(taken[key])
        if not self._nodes:
            raise ValueError("the model has no layers between its input and output")
        last = self._nodes[-1]
        self._final = final_activation_of(last.modules, self.output_shape)

    # -- graph

    @property
    def input(self) -> KerasTensor:
        """The symbolic input (attach layers to a model through ``input`` / ``output``)."""
        return self._input

    @property
    def output(self) -> KerasTensor:
        """The symbolic output: call more layers on it and build a new ``Model(model.input, ...)``."""
        return self._output

    @property
    def layers(self) -> list[Layer]:
        """The layers in the order they run (each once)."""
        seen, out = set(), []
        for node in self._nodes:
            if id(node.layer) not in seen:
                seen.add(id(node.layer))
                out.append(node.layer)
        return out

    def get_layer(self, name: str) -> Layer:
        """The layer registered under ``name`` (its module prefix, e.g. ``"dense_1"``)."""
        for node, node_name in zip(self._nodes, self._node_names):
            if node_name == name:
                return node.layer
        raise ValueError(f"no layer named {name!r}; the layers are {sorted(set(self._node_names))}")

    @property
    def final_activation(self) -> str | None:
        """``"softmax"`` (or ``"sigmoid"`` for one output) when the model ends with it; ``forward`` leaves it out."""
        return self._final

    @final_activation.setter
    def final_activation(self, value: str | None) -> None:
        if value != self._final:
            raise ValueError(f"this Model's final activation is {self._final!r} (set by its last layer), received {value!r}")

    # -- running

    def _run(self, x: torch.Tensor, upto: int | None = None) -> dict[int, torch.Tensor]:
        values: dict[int, torch.Tensor] = {id(self._input): adapt_flat_input(x, self.input_shape)}
        nodes = self._nodes if upto is None else self._nodes[:upto]
        for i, node in enumerate(nodes):
            args = [values[id(t)] for t in node.inputs]
            modules = [m for _, m in node.modules]
            if node is self._nodes[-1] and self._final:
                modules = modules[:-1]  # the final softmax / sigmoid: the loss works on logits
            y = modules[0](*args) if modules else args[0]
            for module in modules[1:]:
                y = module(y)
            values[id(node.output)] = y
        return values

    def _head_node(self) -> Node | None:
        last = self._nodes[-1]
        return last if isinstance(last.layer, Dense) and len(self._nodes) > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a float ``(N, *input_shape)`` batch."""
        _check_shape(x, self.input_shape)
        return self._run(x)[id(self._output)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before the classifier (the last layer when it is a ``Dense``)."""
        _check_shape(x, self.input_shape)
        head = self._head_node()
        if head is None:
            return self.forward(x)
        return self._run(x, upto=len(self._nodes) - 1)[id(head.inputs[0])]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The classifier (last ``Dense``, less a final softmax); ``pre_logits`` skips it."""
        head = self._head_node()
        if pre_logits or head is None:
            return x
        modules = [m for _, m in head.modules]
        if self._final:
            modules = modules[:-1]
        for module in modules:
            x = module(x)
        return x

    def get_classifier(self) -> nn.Module:
        """The last ``Dense``'s linear module (``nn.Identity()`` when the model does not end with one)."""
        head = self._head_node()
        return nn.Identity() if head is None else head.modules[0][1]

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the last ``Dense`` by a fresh one with ``num_classes`` outputs (same activation)."""
        head = self._head_node()
        if head is None:
            raise ValueError("this model does not end with a Dense layer to use as its classifier")
        config = {**head.layer.get_config(), "units": int(num_classes), "name": self._node_names[-1]}
        config.pop("input_shape", None)
        layer = Dense(**config)
        new = call_layer(layer, head.inputs[0])
        for suffix, _ in head.modules:
            delattr(self, self._node_names[-1] + suffix)
        for suffix, module in new.node.modules:
            self.add_module(self._node_names[-1] + suffix, module)
        self._nodes[-1] = new.node
        self._output, self.output_shape = new, new.shape
        self._final = final_activation_of(new.node.modules, new.shape)

    # -- configuration

    def get_config(self) -> dict[str, Any]:
        """A JSON-able description of the graph: each node's layer (class, arguments, name) and inputs."""
        index = {id(self._input): "input"}
        nodes = []
        for i, (node, name) in enumerate(zip(self._nodes, self._node_names)):
            config = node.layer.get_config()
            config.pop("input_shape", None)
            config["name"] = name
            nodes.append({"class_name": type(node.layer).__name__, "config": config,
                          "inbound": [index[id(t)] for t in node.inputs]})
            index[id(node.output)] = i
        return {"class_name": "Model", "name": self.name, "input_shape": list(self.input_shape), "nodes": nodes}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Model":
        """Rebuild the architecture described by ``get_config()`` (its ``state_dict`` loads as is)."""
        if not isinstance(config, dict) or "nodes" not in config or "input_shape" not in config:
            raise ValueError(f"expected a Model config with 'input_shape' and 'nodes', received {config!r:.200}")
        x = Input(shape=tuple(config["input_shape"]))
        tensors: dict[Any, KerasTensor] = {"input": x}
        layers: dict[str, Layer] = {}
        for i, entry in enumerate(config["nodes"]):
            name = entry["config"].get("name")
            if name not in layers:
                layers[name] = layer_from_config(entry)
            inbound = [tensors[k] for k in entry["inbound"]]
            tensors[i] = layers[name](inbound if getattr(layers[name], "multi_input", False) else inbound[0])
        return cls(x, tensors[len(config["nodes"]) - 1], name=config.get("name"))


def layer_from_config(entry: dict[str, Any]) -> Layer:
    """A layer from ``{"class_name", "config"}`` (layers of ``imclass.layers`` and ``imclass.applications``)."""
    name = entry.get("class_name") if isinstance(entry, dict) else None
    if name not in _LAYERS:
        import imclass.applications  # noqa: F401  (registers its layer classes)
    if name not in _LAYERS or name.startswith("_"):
        known = sorted(n for n in _LAYERS if not n.startswith("_"))
        raise ValueError(f"unknown layer class {name!r} in config; known: {known}")
    return _LAYERS[name].from_config(dict(entry.get("config", {})))


def _check_shape(x: torch.Tensor, expected: Shape) -> None:
    received = tuple(x.shape[1:])
    if received == expected or (len(expected) == 1 and received == (1, 1, expected[0])):
        return
    message = f"expected input of shape {_fmt(expected)}, received {_fmt(received)}"
    if len(expected) == 3 and len(received) == 3 and received == (expected[1], expected[2], expected[0]):
        message += "; the model takes channels-first images (N, C, H, W): use x.permute(0, 3, 1, 2)"
    elif len(expected) == 1 and math.prod(received) == expected[0]:
        message += "; flatten the input first (x.flatten(1))"
    raise ValueError(message)


ModelLayer.register_model_class("Model", Model)
