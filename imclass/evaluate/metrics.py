"""Classification metrics on label tensors: accuracy, confusion matrix, per-class accuracy.

All functions take predicted and true labels as int64 tensors or numpy arrays of shape (N,).
"""
from __future__ import annotations

from typing import Any

import torch

from imclass.data.arrays import as_labels

__all__ = ["accuracy", "confusion_matrix", "per_class_accuracy", "top_k_accuracy"]


def _pair(pred: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    labels = as_labels(labels, name="labels")
    pred = as_labels(pred, len(labels), name="predictions")
    return pred, labels


def accuracy(pred: Any, labels: Any) -> float:
    """Fraction of predictions equal to the labels."""
    pred, labels = _pair(pred, labels)
    if len(labels) == 0:
        raise ValueError("expected at least one label, received none")
    return (pred == labels).double().mean().item()


def top_k_accuracy(logits: torch.Tensor, labels: Any, k: int = 5) -> float:
    """Fraction of images whose label is among the ``k`` highest logits."""
    labels = as_labels(labels, len(logits), name="labels")
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"expected 1 <= k <= {logits.shape[1]} (number of classes), received k={k}")
    top = logits.topk(k, dim=1).indices.cpu()  # (N, k)
    return (top == labels[:, None]).any(1).double().mean().item()


def confusion_matrix(pred: Any, labels: Any, num_classes: int | None = None) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts: row = true class, column = predicted class
    (the layout of ``sklearn.metrics.confusion_matrix``)."""
    pred, labels = _pair(pred, labels)
    if num_classes is None:
        num_classes = int(max(pred.max(), labels.max())) + 1 if len(labels) else 0
    if len(labels) and (min(pred.min(), labels.min()) < 0 or max(pred.max(), labels.max()) >= num_classes):
        raise ValueError(f"expected labels and predictions in 0..{num_classes - 1}")
    flat = labels * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(pred: Any, labels: Any, num_classes: int | None = None) -> torch.Tensor:
    """Accuracy within each true class (float64, NaN for a class with no images): the diagonal
    of the confusion matrix over its row sums (recall per class)."""
    cm = confusion_matrix(pred, labels, num_classes).double()
    return cm.diagonal() / cm.sum(1)
