"""Keras's callbacks under their Keras names (the engine's callbacks, ``imclass.train.callbacks``).

    from imclass.callbacks import EarlyStopping, ModelCheckpoint, ReduceLROnPlateau, LearningRateScheduler
    model.fit(x, y, epochs=20, validation_split=0.1,
              callbacks=[ModelCheckpoint("best.safetensors", save_best_only=True), ReduceLROnPlateau(patience=2)])

``ModelCheckpoint(filepath, ...)`` takes Keras's ``filepath`` (``{epoch}`` is filled in; Keras's
``{epoch:02d}`` works too) and writes imclass model files.
"""
from __future__ import annotations

from imclass.train.callbacks import (
    Callback,
    CSVLogger,
    EarlyStopping,
    EpochLogger,
    LearningRateScheduler,
    ModelCheckpoint,
    ProgressBar,
    ReduceLROnPlateau,
    TensorBoard,
    TrainingCurves,
)
from imclass.train.state import History

__all__ = [
    "CSVLogger",
    "Callback",
    "EarlyStopping",
    "EpochLogger",
    "History",
    "LearningRateScheduler",
    "ModelCheckpoint",
    "ProgressBar",
    "ReduceLROnPlateau",
    "TensorBoard",
    "TrainingCurves",
]
