"""Keras's applications on timm's architectures: ``InceptionV3``, ``ResNet50``, ``VGG16``, ...
(public face: it re-exports ``imclass.models.applications``, where the module doc explains the
arguments).

    base = InceptionV3(weights="imagenet", include_top=False)
    y = GlobalAveragePooling2D()(base.output)
    model = Model(inputs=base.input, outputs=Dense(10, activation="softmax")(y))
"""
from __future__ import annotations

from imclass.models.applications import *  # noqa: F403 -- the face re-exports models.applications' __all__
from imclass.models.applications import AppSpec, TimmBody, application  # noqa: F401 -- importable here as before
from imclass.models.applications import __all__  # noqa: F401 -- the one list of public names, kept with the code
