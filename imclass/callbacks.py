"""Keras's callbacks under their Keras names and arguments, on the engine's callbacks (public face: it
re-exports ``imclass.train.keras_callbacks`` and ``imclass.train.callbacks``, where the code lives).

    from imclass.callbacks import EarlyStopping, ModelCheckpoint, ReduceLROnPlateau, LearningRateScheduler
    model.fit(x, y, epochs=20, validation_split=0.1,
              callbacks=[ModelCheckpoint("best.safetensors", save_best_only=True), ReduceLROnPlateau(patience=2)])

``ModelCheckpoint``, ``EarlyStopping``, ``CSVLogger`` and ``TensorBoard`` take Keras's argument names and
defaults (``filepath`` with ``{epoch}`` / ``{epoch:02d}``, ``save_best_only=False``, ``patience=0``,
``restore_best_weights``, ...) and write imclass files (model files are ``.safetensors``).
"""
from __future__ import annotations

from imclass.train.callbacks import (
    Callback,
    EpochLogger,
    LearningRateScheduler,
    ProgressBar,
    ReduceLROnPlateau,
    TrainingCurves,
)
from imclass.train.keras_callbacks import CSVLogger, EarlyStopping, ModelCheckpoint, TensorBoard
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
