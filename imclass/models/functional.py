"""Keras's functional API: ``Input``, layers called on symbolic tensors, ``Model(inputs, outputs)``.

    from imclass.layers import Add, Conv2D, Dense, GlobalAveragePooling2D
    from imclass.models import Input, Model

    x = Input(shape=(32, 32, 3))
    y = Conv2D(16, 3, padding="same", activation="relu")(x)
    z = Conv2D(16, 3, padding="same")(y)
    z = Add()([y, z])                                   # a residual connection
    out = Dense(10, activation="softmax")(GlobalAveragePooling2D()(z))
    model = Model(inputs=x, outputs=out)                # a plain torch.nn.Module

The symbolic tensors (``KerasTensor``, ``Node``, ``Input``, ``call_layer``) live below the layers, in
``imclass.nn.symbolic``; calling a layer on one infers the shape and builds the layer's torch modules
right away (so sizes are never written by hand, as in ``Sequential``). ``Model`` collects the modules
between its input and output into one ``nn.Module`` whose ``forward`` runs the graph. Like
``Sequential`` it returns logits: a final softmax (or the sigmoid of a one-unit output) is recorded
in ``final_activation``, not applied.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from imclass.models.head import ClassifierHead, HeadContract
from imclass.models.keras_training import KerasMethods, KerasState
from imclass.nn.core import Dense
from imclass.nn.layer import Layer, LayerNames, final_activation_of, layer_from_config
from imclass.nn.model_layer import ModelLayer
from imclass.nn.shapes import Shape, adapt_flat_input, check_input_shape
from imclass.nn.symbolic import Input, KerasTensor, Node, as_tensor_list, call_layer, graph_nodes

__all__ = ["Input", "KerasTensor", "Model", "Node"]


class Model(KerasMethods, HeadContract, nn.Module):
    """A model from a graph of layers: ``Model(inputs=x, outputs=y)`` with ``x`` from ``Input`` (or
    another model's ``input``) and ``y`` from calling layers on it. One input, one output.

    ``forward`` takes float ``(N, *input_shape)`` (channels-first images) and returns logits;
    ``compile`` / ``fit`` / ``evaluate`` / ``predict`` / ``summary`` / ``save`` work as in Keras
    (on ``imclass.Classifier``); ``get_config`` / ``from_config`` rebuild the same architecture with
    the same ``state_dict`` keys (model files use them).
    """

    def __init__(self, inputs: Any = None, outputs: Any = None, name: str | None = None) -> None:
        nn.Module.__init__(self)
        ins = as_tensor_list(inputs, "inputs")
        outs = as_tensor_list(outputs, "outputs")
        if len(ins) != 1 or len(outs) != 1:
            raise ValueError(f"Model takes one input and one output (images -> class scores), received "
                             f"{len(ins)} inputs and {len(outs)} outputs")
        self.name = name or "model"
        self._keras_state: KerasState | None = None  # what compile() set up (imclass.models.keras_training)
        self.history: Any = None  # the History of the last fit(), as Keras's model.history
        self.load_report: Any = None  # the pretrained weights' report (an application built with weights=)
        self.preprocessing: Any = None  # the preprocessing those weights expect
        self._input, self._output = ins[0], outs[0]
        self.input_shape: Shape = ins[0].shape
        self.output_shape: Shape = outs[0].shape
        self._nodes = [n for n in graph_nodes(ins, outs[0]) if n.layer is not None]
        self._node_names: list[str] = []
        names = LayerNames()
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a float ``(N, *input_shape)`` batch."""
        check_input_shape(x, self.input_shape)
        return self._run(x)[id(self._output)]

    # -- classifier (timm's contract: imclass.models.head)

    def classifier_head(self) -> ClassifierHead | None:
        """The last node as the classifier when it is a ``Dense`` (after at least one other layer)."""
        last = self._nodes[-1]
        if not isinstance(last.layer, Dense) or len(self._nodes) < 2:
            return None
        modules = [m for _, m in last.modules]
        return ClassifierHead(last.layer, self._node_names[-1], modules[:-1] if self._final else modules)

    def run_body(self, x: torch.Tensor) -> torch.Tensor:
        """Check ``x`` and run the graph up to the classifier's input (the whole graph without one)."""
        check_input_shape(x, self.input_shape)
        if self.classifier_head() is None:
            return self._run(x)[id(self._output)]
        return self._run(x, upto=len(self._nodes) - 1)[id(self._nodes[-1].inputs[0])]

    def replace_classifier(self, dense: Dense, head: ClassifierHead) -> None:
        """Call ``dense`` on the old classifier's input and register it under the same name."""
        node = self._nodes[-1]
        new = call_layer(dense, node.inputs[0])
        for suffix, _ in node.modules:
            delattr(self, head.name + suffix)
        for suffix, module in new.node.modules:
            self.add_module(head.name + suffix, module)
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


ModelLayer.register_model_class("Model", Model)
