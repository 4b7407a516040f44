"""Keras's applications on timm's architectures: ``InceptionV3``, ``ResNet50``, ``VGG16``, ...
(public face: it re-exports ``imclass.models.applications``, where the module doc explains the
arguments).

    base = InceptionV3(weights="imagenet", include_top=False)
    y = GlobalAveragePooling2D()(base.output)
    model = Model(inputs=base.input, outputs=Dense(10, activation="softmax")(y))
"""
from __future__ import annotations

from imclass.models.applications import (
    APPLICATIONS,
    Application,
    AppSpec,
    DenseNet121,
    EfficientNetB0,
    InceptionV3,
    MobileNetV2,
    NASNetLarge,
    NASNetMobile,
    ResNet50,
    ResNet101,
    ResNet152,
    TimmBody,
    VGG16,
    Xception,
    application,
)

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
