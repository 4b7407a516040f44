"""Confident learning (Northcutt, Jiang, Chuang, "Confident Learning: Estimating Uncertainty in Dataset
Labels", JAIR 70, 2021), written from the paper.

Given out-of-sample predicted probabilities ``P`` (n, m) and the given labels ``s`` (n,):

1. per-class thresholds ``t_j``: the average self-confidence of the images labelled ``j``,
   ``t_j = mean(P[i, j] for i with s_i = j)`` (eq. 2);
2. the confident joint ``C[i][j]``: the images labelled ``i`` whose probability of ``j`` reaches
   ``t_j``; an image above several thresholds counts for the class it is most likely to be,
   ``argmax_{j: P[x, j] >= t_j} P[x, j]`` (eq. 1); images above none are not counted;
3. calibration: each row rescaled to the count of its given label, the whole divided by ``n``:
   ``Q[i][j] = (C[i][j] / sum_j C[i][j]) * n_i / n``, the estimated joint of given and true labels
   (eq. 3); ``n * sum_{i != j} Q[i][j]`` estimates the number of label errors;
4. selection (section 3.2): ``"confident_joint"`` (C_confusion: the off-diagonal of ``C``),
   ``"prune_by_class"`` (in each class ``i`` the ``n * sum_{j != i} Q[i][j]`` images with the lowest
   self-confidence), ``"prune_by_noise_rate"`` (for each off-diagonal ``(i, j)`` the ``n * Q[i][j]``
   images labelled ``i`` with the largest margin ``P[x, j] - P[x, i]``), ``"both"`` (the two
   prunes' intersection). As in the reference implementation, an image whose predicted class is
   its given label is never selected by the prunes;
5. ranking (section 3.2 and Northcutt et al. 2021b): by self-confidence ``P[x, s]`` or by the
   normalised margin ``(P[x, s] - max_{j != s} P[x, j] + 1) / 2``, lowest first.

Pure numpy; no dependency on cleanlab (AGPL-3.0), which ``bench/label_review.py`` runs beside it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FILTERS", "RANKINGS", "LabelIssues", "calibrate", "confident_joint", "find_label_issues",
           "label_quality", "thresholds"]

FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_joint")
RANKINGS = ("self_confidence", "normalized_margin")


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"expected probabilities (n, classes) and n labels, received shapes {probs.shape} and {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"expected labels in 0..{probs.shape[1] - 1}, received {labels.min()}..{labels.max()}")
    if not np.isfinite(probs).all():
        raise ValueError("expected finite probabilities, received NaN or infinity")
    return probs, labels


def thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class thresholds (m,): the average self-confidence of each class's images (eq. 2).
    A class with no image gets threshold 1."""
    probs, labels = _check(probs, labels)
    m = probs.shape[1]
    counts = np.bincount(labels, minlength=m)
    sums = np.bincount(labels, weights=probs[np.arange(len(labels)), labels], minlength=m)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)


def confident_joint(probs: np.ndarray, labels: np.ndarray, thresh: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(C, guess)``: the confident joint (m, m) int64, rows = given label, columns = true label (eq. 1),
    and each image's confident true-label guess (n,), -1 where no probability reaches its threshold."""
    probs, labels = _check(probs, labels)
    t = thresholds(probs, labels) if thresh is None else np.asarray(thresh, dtype=np.float64)
    above = probs >= t[None, :] - 1e-12  # (n, m): which classes each image confidently belongs to
    masked = np.where(above, probs, -np.inf)
    guess = np.where(above.any(1), masked.argmax(1), -1)  # argmax over the confident classes only
    m = probs.shape[1]
    counted = guess >= 0
    joint = np.zeros((m, m), dtype=np.int64)
    np.add.at(joint, (labels[counted], guess[counted]), 1)
    return joint, guess


def calibrate(joint: np.ndarray, labels: np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """The estimated joint ``Q`` (m, m) of given (rows) and true (columns) labels, summing to 1 (eq. 3):
    each row of the confident joint rescaled to the number of images carrying that label."""
    joint = np.asarray(joint, dtype=np.float64)
    m = joint.shape[0] if num_classes is None else num_classes
    counts = np.bincount(np.asarray(labels).astype(np.int64), minlength=m).astype(np.float64)
    rows = joint.sum(1, keepdims=True)
    per_row = np.where(rows > 0, joint / np.where(rows > 0, rows, 1), np.eye(m))  # an uncounted class: all on the diagonal
    q = per_row * counts[:, None]
    return q / max(q.sum(), 1e-300)


def label_quality(probs: np.ndarray, labels: np.ndarray, method: str = "self_confidence") -> np.ndarray:
    """Quality of each given label in [0, 1], lower = more likely wrong: the self-confidence
    ``P[x, s]``, or the normalised margin ``(P[x, s] - max_{j != s} P[x, j] + 1) / 2``."""
    probs, labels = _check(probs, labels)
    own = probs[np.arange(len(labels)), labels]
    if method == "self_confidence":
        return own
    if method == "normalized_margin":
        others = probs.copy()
        others[np.arange(len(labels)), labels] = -np.inf
        return (own - others.max(1) + 1.0) / 2.0
    raise ValueError(f"expected ranking in {RANKINGS}, received {method!r}")


@dataclass
class LabelIssues:
    """What :func:`find_label_issues` found: ``indices`` ranked most suspicious first, the
    ``suggested`` class of each (its most likely other class), their ``quality`` (lower = worse), and
    the estimates behind them."""

    indices: np.ndarray  # (k,) int64, ranked
    suggested: np.ndarray  # (k,) int64
    quality: np.ndarray  # (k,) float64
    thresholds: np.ndarray  # (m,)
    joint: np.ndarray  # (m, m) confident joint, counts
    calibrated: np.ndarray  # (m, m) estimated joint Q, sums to 1
    estimated_errors: int  # round(n * sum of Q's off-diagonal)


def _round_rows(counts: np.ndarray) -> np.ndarray:
    """Round a non-negative matrix to integers keeping each row's (rounded) total (largest remainders)."""
    floor = np.floor(counts).astype(np.int64)
    out = floor.copy()
    for r in range(len(counts)):
        short = int(round(counts[r].sum())) - int(floor[r].sum())
        if short > 0:
            order = np.argsort(-(counts[r] - floor[r]), kind="stable")
            out[r, order[:short]] += 1
    return out


def find_label_issues(probs: np.ndarray, labels: np.ndarray, *, filter_by: str = "prune_by_noise_rate",
                      rank_by: str = "self_confidence") -> LabelIssues:
    """The images whose given label is probably wrong, by confident learning (see the module docstring).

    ``probs`` must be out-of-sample (cross-validated, or a model's predictions on data it never saw).
    ``filter_by`` picks the selection rule (:data:`FILTERS`), ``rank_by`` the order (:data:`RANKINGS`).
    """
    if filter_by not in FILTERS:
        raise ValueError(f"expected filter_by in {FILTERS}, received {filter_by!r}")
    if rank_by not in RANKINGS:
        raise ValueError(f"expected rank_by in {RANKINGS}, received {rank_by!r}")
    probs, labels = _check(probs, labels)
    n, m = probs.shape
    t = thresholds(probs, labels)
    joint, guess = confident_joint(probs, labels, t)
    q = calibrate(joint, labels, m)
    off = q * n
    np.fill_diagonal(off, 0.0)
    estimated = int(round(off.sum()))
    prune = _round_rows(off)  # (given, true) -> how many images to select
    predicted = probs.argmax(1)
    selected = np.zeros(n, dtype=bool)
    if filter_by == "confident_joint":
        selected = (guess >= 0) & (guess != labels)
    else:
        by_class = np.zeros(n, dtype=bool)
        by_noise = np.zeros(n, dtype=bool)
        for i in range(m):
            members = np.flatnonzero(labels == i)
            if not len(members):
                continue
            k = min(int(prune[i].sum()), len(members) - 1)  # keep at least one image in every class
            if k > 0:
                by_class[members[np.argsort(probs[members, i], kind="stable")[:k]]] = True
            for j in range(m):
                k = int(prune[i, j])
                if j == i or k <= 0:
                    continue
                margin = probs[members, j] - probs[members, i]
                by_noise[members[np.argsort(-margin, kind="stable")[:k]]] = True
        selected = {"prune_by_class": by_class, "prune_by_noise_rate": by_noise, "both": by_class & by_noise}[filter_by]
        selected &= predicted != labels
    idx = np.flatnonzero(selected)
    quality = label_quality(probs, labels, rank_by)[idx]
    order = np.argsort(quality, kind="stable")
    idx, quality = idx[order], quality[order]
    others = probs[idx].copy()
    others[np.arange(len(idx)), labels[idx]] = -np.inf
    return LabelIssues(idx.astype(np.int64), others.argmax(1).astype(np.int64), quality, t, joint, q, estimated)
