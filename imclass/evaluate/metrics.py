"""Classification metrics: accuracy, confusion matrix, per-class accuracy on label tensors; the
evaluation report's numbers (precision / recall / F1, top-k, calibration, temperature scaling) on
class probabilities, from scikit-learn and torchmetrics.

Labels are int64 tensors or numpy arrays of shape (N,); probabilities and logits are (N, C).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from imclass.data.arrays import as_labels

# Deferred imports (inside functions), for start-up time: sklearn.metrics, torchmetrics.functional.classification
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["accuracy", "confusion_matrix", "per_class_accuracy", "top_k_accuracy", "classification_metrics",
           "reliability_bins", "expected_calibration_error", "fit_temperature", "nll"]


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


# ---------------------------------------------------------------------------------------------
# the evaluation report's numbers: from scikit-learn and torchmetrics, on probabilities

def classification_metrics(probs: torch.Tensor, labels: Any, classes: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, top-5, per-class precision / recall / F1 / support and the confusion matrix
    (counts and row-normalised) of class probabilities ``probs`` (N, C) against ``labels`` (N,).

    The prediction is the most probable class (the first among ties, as ``argmax``). Accuracy and
    top-k come from torchmetrics, the per-class figures and the confusion matrix from scikit-learn.
    """
    from sklearn.metrics import confusion_matrix as sk_confusion, precision_recall_fscore_support
    from torchmetrics.functional.classification import multiclass_accuracy

    probs, labels = _probs_labels(probs, labels)
    n, c = probs.shape
    classes = list(classes) if classes is not None else [str(i) for i in range(c)]
    if len(classes) != c:
        raise ValueError(f"expected {c} class names (one per probability column), received {len(classes)}")
    pred = probs.argmax(1)
    k = min(5, c)
    labels_list = list(range(c))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels.numpy(), pred.numpy(), labels=labels_list, zero_division=0
    )
    cm = sk_confusion(labels.numpy(), pred.numpy(), labels=labels_list)
    rows = cm.sum(axis=1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    per_class = {
        name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
               "support": int(support[i])}
        for i, name in enumerate(classes)
    }
    return {
        "images": n,
        "accuracy": float(multiclass_accuracy(probs, labels, num_classes=c, average="micro")),
        f"top{k}_accuracy": float(multiclass_accuracy(probs, labels, num_classes=c, average="micro", top_k=k)),
        "top_k": k,
        "macro_f1": float(f1[support > 0].mean()) if (support > 0).any() else 0.0,
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalised": normalised.tolist(),
    }


def reliability_bins(probs: torch.Tensor, labels: Any, n_bins: int = 15) -> dict[str, Any]:
    """The reliability diagram: the top-class confidence cut into ``n_bins`` equal-width bins on
    [0, 1], with each bin's image count, mean confidence and accuracy, and the expected calibration
    error ``ece`` (torchmetrics' ``multiclass_calibration_error``, L1 norm, same bins)."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    if n_bins < 1:
        raise ValueError(f"expected n_bins >= 1, received {n_bins}")
    probs, labels = _probs_labels(probs, labels)
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bin i holds confidences in [edges[i], edges[i+1]) as torchmetrics bins them; the last bin
    # also holds confidence 1 (torchmetrics counts those apart: its ECE then differs slightly)
    index = (torch.bucketize(conf.double(), edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(index, minlength=n_bins).double()
    conf_sum = torch.bincount(index, weights=conf.double(), minlength=n_bins)
    acc_sum = torch.bincount(index, weights=correct, minlength=n_bins)
    has = count > 0
    mean_conf = torch.where(has, conf_sum / count.clamp(min=1), torch.nan)
    mean_acc = torch.where(has, acc_sum / count.clamp(min=1), torch.nan)
    ece = multiclass_calibration_error(probs, labels, num_classes=probs.shape[1], n_bins=n_bins, norm="l1")
    return {
        "ece": float(ece),
        "n_bins": n_bins,
        "edges": edges.tolist(),
        "count": [int(v) for v in count],
        "confidence": [None if v != v else float(v) for v in mean_conf.tolist()],
        "accuracy": [None if v != v else float(v) for v in mean_acc.tolist()],
        "mean_confidence": float(conf.double().mean()),
    }


def expected_calibration_error(probs: torch.Tensor, labels: Any, n_bins: int = 15) -> float:
    """ECE: the image-weighted mean |accuracy - confidence| over equal-width confidence bins (torchmetrics)."""
    return reliability_bins(probs, labels, n_bins)["ece"]


def fit_temperature(logits: torch.Tensor, labels: Any, max_iter: int = 100) -> float:
    """The temperature T > 0 minimising the negative log-likelihood of ``softmax(logits / T)`` on
    held-out (validation) data: temperature scaling (Guo et al. 2017), fitted with L-BFGS on log T."""
    logits = torch.as_tensor(logits).detach().double().cpu()
    labels = as_labels(labels, len(logits), name="labels")
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"expected logits of shape (N, C) with N >= 1, received {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("expected finite logits to fit a temperature, received NaN or infinite values")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def nll(logits: torch.Tensor, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)``."""
    logits = torch.as_tensor(logits).double().cpu()
    labels = as_labels(labels, len(logits), name="labels")
    return float(torch.nn.functional.cross_entropy(logits / temperature, labels))


def _probs_labels(probs: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.as_tensor(probs).detach().cpu()
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"expected probabilities of shape (N, C) with N >= 1, received {tuple(probs.shape)}")
    labels = as_labels(labels, len(probs), name="labels")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"expected labels in 0..{probs.shape[1] - 1} (one per probability column), "
                         f"received {int(labels.min())}..{int(labels.max())}")
    return probs.float(), labels
