"""The base of every course layer, the one registry of layer classes (``layer_from_config``), the one
rule that names a model's layers uniquely, and Keras's weight initialisation.

A layer here is a small *specification*: it validates its arguments in ``__init__`` and, given
the shape of its input, ``build``s plain ``torch.nn`` modules and says its output shape.
"""
from __future__ import annotations

from typing import Any, ClassVar, Container, Sequence

import torch.nn as nn

from imclass.nn.shapes import Shape, to_channels_first
from imclass.nn.symbolic import call_layer

__all__ = ["Layer", "LayerNames", "final_activation_of", "keras_init", "known_layers", "layer_from_config",
           "unique_layer_name"]

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
        # (input shape, modules, output shape) once called on a symbolic tensor (functional API): a layer
        # called again reuses its modules, i.e. shares its weights
        self.built_for: tuple[Any, list[tuple[str, nn.Module]], Any] | None = None

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        """The output shape (without batch) for an input shape (without batch)."""
        raise NotImplementedError

    def build(self, input_shape: Shape) -> list[tuple[str, nn.Module]]:
        """The torch modules computing this layer, as ``(name suffix, module)`` pairs ("" for the main one)."""
        raise NotImplementedError

    def __call__(self, inputs: Any) -> Any:
        """Keras's functional API: call the layer on a symbolic tensor from ``Input`` (or a list of
        them for merges) to get the symbolic output (see ``imclass.nn.symbolic``)."""
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



def known_layers() -> list[str]:
    """The public layer class names ``layer_from_config`` can rebuild (those imported so far)."""
    return sorted(n for n in _LAYERS if not n.startswith("_"))


def layer_from_config(entry: dict[str, Any]) -> Layer:
    """A layer from ``{"class_name", "config"}``: any ``Layer`` subclass imported so far (the course's
    layers, and the applications' layer once ``imclass.models`` is imported, which every model
    config passes through)."""
    name = entry.get("class_name") if isinstance(entry, dict) else None
    if name not in _LAYERS or name.startswith("_"):
        raise ValueError(f"unknown layer class {name!r} in config; known: {known_layers()}")
    return _LAYERS[name].from_config(dict(entry.get("config", {})))


def unique_layer_name(layer: Layer, taken: Container[str]) -> str:
    """The one naming rule of a model's layers: the layer's own ``name`` (an error when ``taken``), else
    its Keras prefix numbered past the names ``taken`` (``conv2d``, ``conv2d_1``, ...)."""
    if layer.name is not None:
        if layer.name in taken:
            raise ValueError(f"layer name {layer.name!r} is used twice in this model")
        return layer.name
    name, i = layer.prefix, 0
    while name in taken:
        i += 1
        name = f"{layer.prefix}_{i}"
    return name


class LayerNames:
    """Module-name prefixes for the layers of one model as they are added (``unique_layer_name``
    against the names assigned so far and the model's modules)."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def assign(self, layer: Layer, modules: Any) -> str:
        """The unique name of ``layer``, remembered."""
        name = unique_layer_name(layer, self.used | set(modules))
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



def keras_init(module: nn.Linear | nn.Conv2d) -> None:
    """Keras's defaults: Glorot-uniform kernel, zero bias (the course's models were trained this way)."""
    # Keras defaults: Glorot-uniform kernel, zero bias (the course's models were trained this way).
    nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
