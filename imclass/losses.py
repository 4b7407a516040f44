"""Keras's losses by name and as objects, computed on the model's logits.

    model.compile(loss="categorical_crossentropy", optimizer=Adam(lr=0.001))   # one-hot (or soft) labels
    model.compile(loss="sparse_categorical_crossentropy", ...)                   # integer labels
    model.compile(loss=BinaryCrossentropy(label_smoothing=0.1), ...)             # one sigmoid output

imclass models leave a final ``softmax`` / ``sigmoid`` out of ``forward`` (they return logits and
record ``final_activation``), so the engine calls :meth:`Loss.logits_loss` ``(logits, targets)``:
the numerically stable form Keras uses with ``from_logits=True``. Calling a loss object as Keras does,
``loss(y_true, y_pred)``, works on probabilities (``from_logits=False``, the Keras default) or logits.

:meth:`Loss.targets` turns the labels a user holds into what the loss trains on and says, when they
do not fit, which loss expects which labels.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "BinaryCrossentropy",
    "CategoricalCrossentropy",
    "Loss",
    "SparseCategoricalCrossentropy",
    "binary_crossentropy",
    "categorical_crossentropy",
    "get",
    "names",
    "sparse_categorical_crossentropy",
]

_EPS = 1e-7  # Keras's backend epsilon: probabilities are clipped to [eps, 1 - eps]


def _tensor(y: Any) -> torch.Tensor:
    if isinstance(y, torch.Tensor):
        return y
    return torch.as_tensor(np.asarray(y))


class Loss:
    """A Keras-style loss: ``name``, ``label_smoothing``, ``from_logits`` (for Keras-order calls only)."""

    name = "loss"

    def __init__(self, from_logits: bool = False, label_smoothing: float = 0.0) -> None:
        if isinstance(label_smoothing, bool) or not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"expected 0 <= label_smoothing < 1, received label_smoothing={label_smoothing!r}")
        self.from_logits = bool(from_logits)
        self.label_smoothing = float(label_smoothing)

    def logits_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch from the model's logits ``(N, outputs)`` and prepared targets."""
        raise NotImplementedError

    def targets(self, y: Any, outputs: int) -> torch.Tensor:
        """User labels -> the targets :meth:`logits_loss` takes, for a model with ``outputs`` outputs."""
        raise NotImplementedError

    def __call__(self, y_true: Any, y_pred: Any) -> torch.Tensor:
        """Keras order: ``loss(y_true, y_pred)``; ``y_pred`` are probabilities unless ``from_logits``."""
        y_pred = _tensor(y_pred).float()
        if y_pred.ndim == 1:
            y_pred = y_pred[:, None]
        logits = y_pred if self.from_logits else self._to_logits(y_pred)
        return self.logits_loss(logits, self.targets(y_true, y_pred.shape[1]))

    def _to_logits(self, probs: torch.Tensor) -> torch.Tensor:
        return probs.clamp(_EPS, 1 - _EPS).log()

    def get_config(self) -> dict[str, Any]:
        """The ``__init__`` arguments."""
        return {"from_logits": self.from_logits, "label_smoothing": self.label_smoothing}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class CategoricalCrossentropy(Loss):
    """Cross-entropy against one-hot or soft targets ``(N, classes)`` (rows summing to 1)."""

    name = "categorical_crossentropy"

    def logits_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def targets(self, y: Any, outputs: int) -> torch.Tensor:
        t = _tensor(y)
        if t.ndim == 1 or (t.ndim == 2 and t.shape[1] == 1 and outputs != 1):
            raise ValueError(
                f"categorical_crossentropy expects one-hot (or probability) labels of shape (N, {outputs}), one "
                f"column per model output; received labels of shape {tuple(t.shape)}: convert integer labels with "
                f"imclass.utils.to_categorical(y, {outputs}) or use loss='sparse_categorical_crossentropy'"
            )
        if t.ndim != 2 or t.shape[1] != outputs:
            raise ValueError(
                f"categorical_crossentropy expects labels of shape (N, {outputs}) for a model with {outputs} "
                f"outputs, received labels of shape {tuple(t.shape)}"
            )
        t = t.float()
        if bool((t < 0).any()) or not torch.allclose(t.sum(1), torch.ones(len(t)), atol=1e-3):
            raise ValueError("categorical_crossentropy expects each label row to be one-hot or probabilities "
                             "summing to 1, received rows that are not")
        return t

    def _to_logits(self, probs: torch.Tensor) -> torch.Tensor:
        probs = probs / probs.sum(1, keepdim=True)  # Keras normalises the rows of y_pred
        return super()._to_logits(probs)


class SparseCategoricalCrossentropy(Loss):
    """Cross-entropy against integer class labels ``(N,)``."""

    name = "sparse_categorical_crossentropy"

    def logits_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)

    def targets(self, y: Any, outputs: int) -> torch.Tensor:
        t = _tensor(y)
        if t.ndim == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.ndim != 1:
            hint = " (one-hot?): use loss='categorical_crossentropy' or y.argmax(1)" if t.ndim == 2 else ""
            raise ValueError(
                f"sparse_categorical_crossentropy expects integer class labels of shape (N,), received labels of "
                f"shape {tuple(t.shape)}{hint}"
            )
        if t.is_floating_point() and not torch.equal(t, t.round()):
            raise ValueError("sparse_categorical_crossentropy expects integer class labels, received non-integer values")
        t = t.long()
        if len(t) and (int(t.min()) < 0 or int(t.max()) >= outputs):
            raise ValueError(
                f"sparse_categorical_crossentropy expects labels in 0..{outputs - 1} for a model with {outputs} "
                f"outputs, received values from {int(t.min())} to {int(t.max())}"
            )
        return t


class BinaryCrossentropy(Loss):
    """Binary cross-entropy of one sigmoid output against 0/1 labels ``(N,)`` or ``(N, 1)``.

    ``label_smoothing`` moves the targets towards 0.5 (``y * (1 - s) + s / 2``), as Keras does.
    """

    name = "binary_crossentropy"

    def logits_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[1] != 1:
            raise ValueError(
                f"binary_crossentropy expects a model with one (sigmoid) output, received outputs of shape "
                f"{tuple(logits.shape)}: end the model with Dense(1, activation='sigmoid'), or use "
                "categorical_crossentropy for several classes"
            )
        y = targets.float()
        if self.label_smoothing:
            y = y * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        return F.binary_cross_entropy_with_logits(logits[:, 0], y)

    def targets(self, y: Any, outputs: int) -> torch.Tensor:
        t = _tensor(y)
        if outputs != 1:
            raise ValueError(
                f"binary_crossentropy expects a model with one (sigmoid) output, this model has {outputs} outputs: "
                "end it with Dense(1, activation='sigmoid'), or use categorical_crossentropy for several classes"
            )
        if t.ndim == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.ndim != 1:
            raise ValueError(f"binary_crossentropy expects labels of shape (N,) or (N, 1), received {tuple(t.shape)}")
        if not bool(((t == 0) | (t == 1)).all()):
            raise ValueError("binary_crossentropy expects labels 0 or 1, received other values")
        return t.long()

    def _to_logits(self, probs: torch.Tensor) -> torch.Tensor:
        p = probs.clamp(_EPS, 1 - _EPS)
        return (p / (1 - p)).log()


_LOSSES: dict[str, type[Loss]] = {
    "categorical_crossentropy": CategoricalCrossentropy,
    "sparse_categorical_crossentropy": SparseCategoricalCrossentropy,
    "binary_crossentropy": BinaryCrossentropy,
}


def names() -> list[str]:
    """The loss names :func:`get` understands."""
    return sorted(_LOSSES)


def get(loss: str | Loss) -> Loss:
    """A loss object from a Keras name (``"categorical_crossentropy"``, ...) or the object itself."""
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str) and loss.lower() in _LOSSES:
        return _LOSSES[loss.lower()]()
    raise ValueError(f"unknown loss {loss!r}; expected one of {names()} or an imclass.losses.Loss object")


def categorical_crossentropy(y_true: Any, y_pred: Any, from_logits: bool = False,
                             label_smoothing: float = 0.0) -> torch.Tensor:
    """Keras's function form: mean cross-entropy of probabilities (or logits) against one-hot labels."""
    return CategoricalCrossentropy(from_logits, label_smoothing)(y_true, y_pred)


def sparse_categorical_crossentropy(y_true: Any, y_pred: Any, from_logits: bool = False) -> torch.Tensor:
    """Keras's function form: mean cross-entropy of probabilities (or logits) against integer labels."""
    return SparseCategoricalCrossentropy(from_logits)(y_true, y_pred)


def binary_crossentropy(y_true: Any, y_pred: Any, from_logits: bool = False, label_smoothing: float = 0.0) -> torch.Tensor:
    """Keras's function form: mean binary cross-entropy of one probability (or logit) per sample."""
    return BinaryCrossentropy(from_logits, label_smoothing)(y_true, y_pred)
