"""The resolved ``compile`` options of the engine (``CompileConfig``) and the names it accepts.

One name per concept (docs/training.md, "Names of the configs"):

* ``CompileConfig`` — the resolved ``Classifier.compile`` options, held as ``Classifier.compile_config``
  (``dataclasses.asdict`` gives the plain values that checkpoints and model files record).
* ``train_config`` — the whole run's training config as a model file recorded it (a dict: the
  compile options plus the workflow's settings), read back as ``Classifier.train_config`` and
  written by ``save(..., train_config=...)``.

Deprecated aliases, kept because public code uses them: ``TrainConfig`` (= ``CompileConfig``),
``Classifier.config`` (= ``compile_config``), ``Classifier.training_config()`` (=
``dataclasses.asdict(compile_config)``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


# "cross_entropy" plus Keras's names (imclass.losses): categorical (one-hot or soft labels), sparse, binary
LOSSES = ("cross_entropy", "categorical_crossentropy", "sparse_categorical_crossentropy", "binary_crossentropy")


METRICS = ("accuracy",)


AMP_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass
class CompileConfig:
    """The resolved ``compile`` options (``Classifier.compile_config``), saved beside checkpoints and,
    as part of the run's training config, in model files (read back as ``Classifier.train_config``)."""

    optimizer: str = "adam"
    lr: float = 1e-3
    loss: str = "cross_entropy"
    label_smoothing: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    schedule: str | dict | None = None
    warmup_epochs: float = 0
    metrics: tuple[str, ...] = ("accuracy",)
    l2: float = 0.0
    grad_clip: float | None = None
    amp: str | None = None
    compile: bool | str = False
    channels_last: bool = False


TrainConfig = CompileConfig  # deprecated alias (the former name; imclass.train.TrainConfig keeps working)
