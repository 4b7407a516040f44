"""Keras's applications on timm's architectures: ``InceptionV3``, ``ResNet50``, ``VGG16``, ...

    base = InceptionV3(weights="imagenet", include_top=False)        # or weights=None / weights="my.pth"
    y = GlobalAveragePooling2D()(base.output)
    y = Dense(1024, activation="relu")(y)
    model = Model(inputs=base.input, outputs=Dense(10, activation="softmax")(y))

Each function returns a functional ``imclass.models.Model`` holding one application layer (the timm
network, registered under Keras's model name, e.g. ``inception_v3``), so ``.input`` / ``.output``
attach new heads and ``Sequential([ResNet50(...), ...])`` nests it. Keras's arguments:

* ``weights``: ``None`` (random initialisation), ``"imagenet"`` (the known file under the weights root,
  else timm's hub when online; offline a clear error in seconds naming what to fetch and the
  ``weights=PATH`` alternative) or a path to a weights file (``.safetensors`` / ``.pth``); loaded by
  ``imclass.models.weights.apply_weights``. The report is ``model.load_report``, the preprocessing
  those weights expect ``model.preprocessing`` (Keras users call ``preprocess_input``: scale images
  that way yourself, or pass ``mean``/``std`` to ``compile``).
* ``include_top``: the ImageNet classifier (``classes`` outputs, final softmax) or not;
  ``pooling`` (``None``, ``"avg"``, ``"max"``) for the feature output without it.
* ``input_shape``: ``(H, W, 3)`` (channels-last as in Keras, or channels-first); default the
  network's usual size. Models take channels-first ``(N, C, H, W)`` tensors inside.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from imclass.models.functional import Model
from imclass.models.weights import apply_weights, weights_options
from imclass.nn.conv import SpatialMean
from imclass.nn.core import activation_config, activation_modules, parse_activation
from imclass.nn.layer import Layer
from imclass.nn.shapes import Shape, format_shape, to_channels_first
from imclass.nn.symbolic import Input

__all__ = [
    "APPLICATIONS",
    "Application",
    "DenseNet121",
    "EfficientNetB0",
    "InceptionV3",
    "MobileNetV2",
    "NASNetLarge",
    "NASNetMobile",
    "ResNet101",
    "ResNet152",
    "ResNet50",
    "VGG16",
    "Xception",
]


@dataclass(frozen=True)
class AppSpec:
    """A Keras application: its timm architecture, Keras's default input size and model name, and
    the smallest input Keras accepts."""

    arch: str
    size: int
    name: str
    min_size: int = 32


APPLICATIONS: dict[str, AppSpec] = {
    "InceptionV3": AppSpec("inception_v3", 299, "inception_v3", 75),
    "ResNet50": AppSpec("resnet50", 224, "resnet50"),
    "ResNet101": AppSpec("resnet101", 224, "resnet101"),
    "ResNet152": AppSpec("resnet152", 224, "resnet152"),
    "NASNetLarge": AppSpec("nasnetalarge", 331, "NASNet"),
    "NASNetMobile": AppSpec("nasnetamobile", 224, "NASNet"),  # imclass.models.nasnet_mobile (timm's cells)
    "VGG16": AppSpec("vgg16", 224, "vgg16"),
    "MobileNetV2": AppSpec("mobilenetv2_100", 224, "mobilenetv2_1_00_224"),
    "EfficientNetB0": AppSpec("efficientnet_b0", 224, "efficientnetb0"),
    "Xception": AppSpec("legacy_xception", 299, "xception", 71),
    "DenseNet121": AppSpec("densenet121", 224, "densenet121"),
}
_ARCHS = {spec.arch for spec in APPLICATIONS.values()}


class _GlobalMaxPool2d(nn.Module):
    """Max over all positions: ``(N, C, H, W) -> (N, C)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(2, 3))


class TimmBody(nn.Module):
    """A timm network as one module: its logits (``include_top``) or its unpooled feature map."""

    def __init__(self, model: nn.Module, include_top: bool) -> None:
        super().__init__()
        self.model = model
        self.include_top = include_top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) if self.include_top else self.model.forward_features(x)


def _create(arch: str, num_classes: int, in_chans: int, options: dict[str, Any]) -> nn.Module:
    if arch == "nasnetamobile":
        from imclass.models.nasnet_mobile import NASNetAMobile  # deferred: it imports timm (start-up time)

        return NASNetAMobile(num_classes=num_classes, in_chans=in_chans, **options)
    import timm  # deferred: timm takes seconds to import (start-up time)

    return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans, **options)


class Application(Layer):
    """The layer behind every application: a timm architecture with Keras's ``include_top`` /
    ``pooling`` / ``classes``. ``weights`` are applied when it is built and not kept in its config
    (a model file holds them)."""

    prefix = "application"

    def __init__(self, arch: str, include_top: bool = True, pooling: str | None = None, classes: int = 1000,
                 classifier_activation: Any = "softmax", options: dict[str, Any] | None = None,
                 weights: str | os.PathLike | None = None, weights_dir: str | os.PathLike | None = None,
                 name: str | None = None, input_shape: int | Sequence[int] | None = None) -> None:
        super().__init__(name, input_shape)
        if arch not in _ARCHS:
            raise ValueError(f"unknown application architecture {arch!r}; known: {sorted(_ARCHS)}")
        if pooling not in (None, "avg", "max"):
            raise ValueError(f"expected pooling None, 'avg' or 'max', received pooling={pooling!r}")
        if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
            raise ValueError(f"expected a positive integer for classes, received classes={classes!r}")
        self.arch, self.include_top, self.pooling, self.classes = arch, bool(include_top), pooling, classes
        self.classifier_activation = parse_activation(classifier_activation)
        self.options = dict(options or {})
        self.weights, self.weights_dir = weights, weights_dir
        self.load_report: Any = None
        self._built: tuple[Shape, list[tuple[str, nn.Module]], Shape] | None = None

    def _build_once(self, input_shape: Shape) -> tuple[list[tuple[str, nn.Module]], Shape]:
        if self._built is not None:
            if self._built[0] != tuple(input_shape):
                raise ValueError(f"this {self.arch} layer was built for input {format_shape(self._built[0])}, received "
                                 f"{format_shape(input_shape)}")
            return self._built[1], self._built[2]
        if len(input_shape) != 3:
            raise ValueError(f"{self.arch} expects image input (N, C, H, W), received {format_shape(input_shape)}")
        model = _create(self.arch, self.classes if self.include_top else 0, input_shape[0], self.options)
        if self.weights is not None:
            self.load_report = apply_weights(model, self.arch, self.weights, weights_dir=self.weights_dir)
        body = TimmBody(model, self.include_top)
        was_training = body.training
        body.eval()
        try:
            with torch.no_grad():
                out = tuple(body(torch.zeros(1, *input_shape)).shape[1:])
        except RuntimeError as err:
            raise ValueError(f"{self.arch} cannot take input {format_shape(input_shape)} (too small?): {err}") from None
        finally:
            body.train(was_training)
        modules: list[tuple[str, nn.Module]] = [("", body)]
        if self.include_top:
            modules += activation_modules(self.classifier_activation)
        elif self.pooling is not None:
            modules.append(("_pool", SpatialMean() if self.pooling == "avg" else _GlobalMaxPool2d()))
            out = out[:1]
        self._built = (tuple(input_shape), modules, out)
        return modules, out

    def compute_output_shape(self, input_shape: Shape) -> Shape:
        return self._build_once(input_shape)[1]

    def build(self, input_shape: Shape) -> list[tuple[str, nn.Module]]:
        return self._build_once(input_shape)[0]

    def get_config(self) -> dict[str, Any]:
        return {"arch": self.arch, "include_top": self.include_top, "pooling": self.pooling, "classes": self.classes,
                "classifier_activation": activation_config(self.classifier_activation), "options": dict(self.options),
                **super().get_config()}


def application(keras_name: str, *, include_top: bool = True, weights: str | os.PathLike | None = "imagenet",
                input_tensor: Any = None, input_shape: Sequence[int] | None = None, pooling: str | None = None,
                classes: int = 1000, classifier_activation: Any = "softmax", weights_dir: str | os.PathLike | None = None,
                **options: Any) -> Any:
    """Build the Keras application ``keras_name`` (see the module doc) as a functional ``Model``."""
    spec = APPLICATIONS[keras_name]
    if weights is not None and str(weights) != "imagenet" and not os.path.exists(weights):
        raise ValueError(f"{keras_name}: the weights argument should be None (random initialisation), 'imagenet' or "
                         f"the path to a weights file; no such file {str(weights)!r}")
    if input_tensor is not None:
        x = input_tensor
    else:
        shape = to_channels_first(input_shape) if input_shape is not None else (3, spec.size, spec.size)
        if len(shape) != 3 or min(shape[1:]) < spec.min_size:
            raise ValueError(f"{keras_name} expects input_shape (H, W, C) with H and W >= {spec.min_size}, "
                             f"received input_shape={input_shape!r}")
        x = Input(shape=shape)
    options = {**weights_options(spec.arch, weights, weights_dir), **options}  # e.g. the known file's TF padding
    layer = Application(spec.arch, include_top=include_top, pooling=pooling, classes=classes,
                        classifier_activation=classifier_activation, options=options, weights=weights,
                        weights_dir=weights_dir, name=spec.name)
    model = Model(inputs=x, outputs=layer(x), name=spec.name)
    model.load_report = layer.load_report
    model.preprocessing = layer.load_report.preprocessing if layer.load_report is not None else None
    return model


def _factory(keras_name: str):
    def build(include_top: bool = True, weights: str | os.PathLike | None = "imagenet", input_tensor: Any = None,
              input_shape: Sequence[int] | None = None, pooling: str | None = None, classes: int = 1000,
              classifier_activation: Any = "softmax", **options: Any) -> Any:
        return application(keras_name, include_top=include_top, weights=weights, input_tensor=input_tensor,
                           input_shape=input_shape, pooling=pooling, classes=classes,
                           classifier_activation=classifier_activation, **options)

    spec = APPLICATIONS[keras_name]
    build.__name__ = build.__qualname__ = keras_name
    build.__doc__ = (f"Keras's ``{keras_name}`` on timm's ``{spec.arch}`` (default input {spec.size}x{spec.size}, "
                     f"at least {spec.min_size}); a functional ``Model``. ``weights``: None, 'imagenet' or a path.")
    return build


InceptionV3 = _factory("InceptionV3")
ResNet50 = _factory("ResNet50")
ResNet101 = _factory("ResNet101")
ResNet152 = _factory("ResNet152")
NASNetLarge = _factory("NASNetLarge")
NASNetMobile = _factory("NASNetMobile")
VGG16 = _factory("VGG16")
MobileNetV2 = _factory("MobileNetV2")
EfficientNetB0 = _factory("EfficientNetB0")
Xception = _factory("Xception")
DenseNet121 = _factory("DenseNet121")
