"""``Sequential``: a stack of course layers built into torch modules, with every shape inferred.

::

    from imclass.layers import Conv2D, Dense, Dropout, Flatten, MaxPooling2D, Sequential

    model = Sequential([
        Conv2D(32, 3, padding="same", activation="relu", input_shape=(32, 32, 3)),
        MaxPooling2D(2),
        Flatten(),
        Dense(10, activation="softmax"),
    ])

``Sequential`` builds each layer as it is added, so sizes such as the input of the first ``Dense``
after ``Flatten`` are computed, never written by hand. The result is an ordinary ``nn.Module``
taking float ``(N, C, H, W)`` (or ``(N, features)``) tensors and returning logits.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from imclass.models.head import ClassifierHead, HeadContract
from imclass.models.keras_training import KerasMethods, KerasState
from imclass.nn.core import Dense
from imclass.nn.layer import Layer, final_activation_of, layer_from_config, unique_layer_name
from imclass.nn.model_layer import ModelLayer
from imclass.nn.shapes import Shape, adapt_flat_input, check_input_shape, format_shape, to_channels_first
from imclass.nn.symbolic import Input, KerasTensor, call_layer

__all__ = ["Sequential"]


class Sequential(KerasMethods, HeadContract, nn.Module):
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
        self._keras_state: KerasState | None = None  # what compile() set up (imclass.models.keras_training)
        self.history: Any = None  # the History of the last fit(), as Keras's model.history
        self.load_report: Any = None  # pretrained weights applied inside (an application's report), if any
        self.preprocessing: Any = None  # the preprocessing such weights expect (imclass.data.preprocessing)
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
        if isinstance(layer, KerasTensor) and layer.node.layer is None:  # Input(shape=...)
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
                    f"{type(layer).__name__} was given input shape {format_shape(layer.input_shape)} but the {where} "
                    f"is {format_shape(self.output_shape)}"
                )
        if self.input_shape is None:
            raise ValueError(
                "Sequential needs the input shape: pass input_shape=(32, 32, 3) to Sequential or to the first "
                "layer (input_dim=... for a first Dense)"
            )
        self._symbolic = None
        in_shape = self.output_shape
        out_shape = layer.compute_output_shape(in_shape)
        name = unique_layer_name(layer, set(self._names) | set(self._modules))
        built = []
        for suffix, module in layer.build(in_shape):
            self.add_module(name + suffix, module)
            built.append(name + suffix)
        self.layers.append(layer)
        self._names.append(name)
        self._modules_of.append(built)
        self._shapes.append(out_shape)
        return self

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
            if self.input_shape is None:
                raise ValueError("this Sequential has no input shape yet")
            x = Input(shape=self.input_shape)
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a float ``(N, *input_shape)`` batch."""
        return self.forward_head(self.forward_features(x))

    # -- classifier (timm's contract: imclass.models.head)

    def classifier_head(self) -> ClassifierHead | None:
        """The last Dense (and the layers after it) as the classifier, or None without a Dense."""
        i = self._classifier_index()
        if i is None:
            return None
        return ClassifierHead(self.layers[i], self._names[i], self._split()[1])

    def run_body(self, x: torch.Tensor) -> torch.Tensor:
        """Check ``x`` and run everything before the classifier (the last Dense)."""
        x = adapt_flat_input(x, self.input_shape or ())
        if self.input_shape is None:
            raise ValueError("this Sequential has no layers yet")
        check_input_shape(x, self.input_shape,
                          flat_hint="flatten the input first (x.flatten(1)) or start the model with Flatten()")
        for module in self._split()[0]:
            x = module(x)
        return x

    def replace_classifier(self, dense: Dense, head: ClassifierHead) -> None:
        """Swap the last Dense for ``dense``, keeping the layers that follow it."""
        i = self._classifier_index()
        tail = [self.pop() for _ in range(len(self.layers) - i)][::-1]  # the old Dense and what follows it
        self.add(dense)
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
        layers = [layer_from_config(entry) for entry in config["layers"]]
        return cls(layers, input_shape=tuple(config["input_shape"]), name=config.get("name"))


ModelLayer.register_model_class("Sequential", Sequential)
