"""Keras's callbacks that take Keras's argument names and defaults, on the engine's callbacks
(``imclass.callbacks`` re-exports them beside the engine's own: the public face).

``ModelCheckpoint``, ``EarlyStopping``, ``CSVLogger`` and ``TensorBoard`` translate Keras's arguments
(``filepath`` with ``{epoch}`` / ``{epoch:02d}``, ``save_best_only=False``, ``patience=0``,
``restore_best_weights``, ...) and write imclass files (model files are ``.safetensors``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from imclass.train import callbacks as engine

__all__ = ["CSVLogger", "EarlyStopping", "ModelCheckpoint", "TensorBoard"]


class ModelCheckpoint(engine.ModelCheckpoint):
    """Keras's ``ModelCheckpoint``: save the model after every epoch (``save_best_only=False``, Keras's
    default) or when ``monitor`` improved; ``period`` (Keras 2) saves every ``period`` epochs."""

    def __init__(self, filepath: str | Path, monitor: str = "val_loss", verbose: int = 0, save_best_only: bool = False,
                 save_weights_only: bool = False, mode: str = "auto", save_freq: Any = "epoch",
                 period: int | None = None) -> None:
        if save_freq != "epoch":
            raise ValueError(f"expected save_freq='epoch' (checkpoints are written at epoch ends), received {save_freq!r}")
        super().__init__(filepath, monitor=monitor, mode=mode, save_best_only=save_best_only, every=period or 1)
        self.verbose = verbose


class EarlyStopping(engine.EarlyStopping):
    """Keras's ``EarlyStopping``: stop when ``monitor`` has not improved by more than ``min_delta``
    for ``patience`` epochs (Keras's default 0: the first epoch without improvement)."""

    def __init__(self, monitor: str = "val_loss", min_delta: float = 0.0, patience: int = 0, verbose: int = 0,
                 mode: str = "auto", baseline: float | None = None, restore_best_weights: bool = False) -> None:
        if baseline is not None:
            raise ValueError("EarlyStopping(baseline=...) is not supported")
        super().__init__(monitor=monitor, patience=patience, min_delta=min_delta, mode=mode,
                         restore_best=restore_best_weights)
        self.verbose = verbose


class CSVLogger(engine.CSVLogger):
    """Keras's ``CSVLogger(filename)``: the history as CSV, one row per epoch (comma-separated)."""

    def __init__(self, filename: str | Path, separator: str = ",", append: bool = False) -> None:
        if separator != "," or append:
            raise ValueError("CSVLogger writes comma-separated files, rewritten each epoch (separator=',', append=False)")
        super().__init__(filename)


class TensorBoard(engine.TensorBoard):
    """Keras's ``TensorBoard(log_dir)``: epoch metrics (and the batch loss every ``update_freq``
    batches when it is an int) for TensorBoard."""

    def __init__(self, log_dir: str | Path = "logs", update_freq: Any = "epoch", **_ignored: Any) -> None:
        super().__init__(log_dir, batch_every=update_freq if isinstance(update_freq, int) else 0)
