"""Training: ``Classifier`` (compile / fit / evaluate / predict), callbacks, optimizers, schedules.

See docs/training.md.
"""
from __future__ import annotations

from imclass.train.callbacks import (
    Callback,
    CSVLogger,
    EarlyStopping,
    LRFinder,
    ModelCheckpoint,
    ProgressBar,
    TensorBoard,
    TimeBudget,
    TrainingCurves,
)
from imclass.train.checkpoint import load_checkpoint, save_checkpoint
from imclass.train.classifier import Classifier
from imclass.train.config import CompileConfig, TrainConfig
from imclass.train.device import cpu_has_native_bf16, resolve_device
from imclass.train.inputs import channel_stats
from imclass.train.lr_range import LRFindResult
from imclass.train.optim import Schedule, make_optimizer, make_schedule
from imclass.train.state import History, TrainingDiverged, TrainState

__all__ = [
    "CSVLogger",
    "Callback",
    "Classifier",
    "CompileConfig",
    "EarlyStopping",
    "History",
    "LRFindResult",
    "LRFinder",
    "ModelCheckpoint",
    "ProgressBar",
    "Schedule",
    "TensorBoard",
    "TimeBudget",
    "TrainConfig",
    "TrainState",
    "TrainingCurves",
    "TrainingDiverged",
    "channel_stats",
    "load_checkpoint",
    "make_optimizer",
    "make_schedule",
    "cpu_has_native_bf16",
    "resolve_device",
    "save_checkpoint",
]
