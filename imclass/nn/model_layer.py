"""A whole Keras-style model used as one layer of another (``Sequential([ResNet50(...), Dense(10)])``).

The model classes (``Sequential``, ``Model``) register themselves here when ``imclass.models``
defines them, so this floor never imports the floor above it."""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch.nn as nn

from imclass.nn.core import activation_modules
from imclass.nn.layer import Layer
from imclass.nn.shapes import Shape, format_shape

__all__ = ["ModelLayer"]


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
            raise ValueError(f"the model {self.name or type(self.model).__name__!r} takes input {format_shape(self.model.input_shape)}, "
                             f"received {format_shape(input_shape)}")
        return tuple(self.model.output_shape)

    def build(self, input_shape: Shape) -> list[tuple[str, nn.Module]]:
        self.compute_output_shape(input_shape)
        # the inner model's forward leaves its final softmax/sigmoid to the loss; inside a bigger model it applies
        final = getattr(self.model, "final_activation", None)
        return [("", self.model), *activation_modules((final, {}) if final else None)]

    def get_config(self) -> dict[str, Any]:
        return {"model": {"class_name": type(self.model).__name__, "config": self.model.get_config()},
                **super().get_config()}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "ModelLayer":
        config = dict(config)
        entry = config.pop("model")
        if entry["class_name"] not in cls._model_classes:
            raise ValueError(f"unknown model class {entry['class_name']!r} in config; known: {sorted(cls._model_classes)}")
        return cls(cls._model_classes[entry["class_name"]].from_config(entry["config"]), **config)
