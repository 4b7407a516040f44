"""Pictures of a training run: the two-panel curves (loss | accuracy over whole epochs) and the
confusion matrix with full class names."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from imclass.visualize.plots import pyplot, save_figure

# Deferred imports (inside functions), for start-up time: matplotlib.ticker
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["save_confusion_matrix", "save_curves"]


def save_curves(history: Mapping[str, Sequence[float]], path: str | os.PathLike, *, title: str = "training curves",
                marks: Mapping[str, float] | None = None) -> Path:
    """Two panels, loss | accuracy, over whole epochs (training and validation curves), labelled axes.

    ``history`` has ``epoch`` (1-based) and any of ``loss``, ``val_loss``, ``accuracy``, ``val_accuracy``;
    ``marks`` draws a labelled vertical line at an epoch (e.g. ``{"fine-tuning starts": 15.5}``).
    """
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    epochs = [float(e) for e in history.get("epoch", [])] or list(range(1, len(history.get("loss", [])) + 1))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    names = {"loss": "training", "val_loss": "validation", "accuracy": "training", "val_accuracy": "validation"}
    for ax, keys, ylabel in ((axes[0], ("loss", "val_loss"), "loss (cross-entropy)"),
                             (axes[1], ("accuracy", "val_accuracy"), "accuracy")):
        for key in keys:
            ys = [float(v) if v not in (None, "") else np.nan for v in history.get(key, [])]
            if ys and not all(np.isnan(ys)):
                ax.plot(epochs[: len(ys)], ys, marker="o" if len(ys) <= 40 else None, label=names[key])
        for label, at in (marks or {}).items():
            ax.axvline(at, color="gray", ls="--", lw=1, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, loc="best")
    axes[1].set_ylim(0, 1.0)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def save_confusion_matrix(cm: torch.Tensor | np.ndarray, classes: Sequence[str], path: str | os.PathLike, *,
                          title: str = "confusion matrix") -> Path:
    """The confusion matrix (rows: true class, columns: predicted class) as a PNG: counts in the cells,
    colour by the fraction of the true class, full class names (long names wrapped, never cut)."""
    plt = pyplot()
    cm = np.asarray(cm, dtype=np.int64)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    c = len(classes)
    size = min(14, 3.5 + 0.55 * c)
    fig, ax = plt.subplots(figsize=(size + 1.5, size), dpi=100)
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    if c <= 40:
        names = ["\n".join(textwrap.wrap(str(n), 14)) or "?" for n in classes]
        turn = c > 4 and max(len(str(n)) for n in classes) > 3  # digits stay upright
        ax.set_xticks(range(c), names, rotation=45 if turn else 0, ha="right" if turn else "center",
                      fontsize=9 if c <= 20 else 7)
        ax.set_yticks(range(c), names, fontsize=9 if c <= 20 else 7)
        if c <= 25:
            for i in range(c):
                for j in range(c):
                    ax.text(j, i, f"{cm[i, j]:,}", ha="center", va="center", fontsize=8 if c <= 12 else 6,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(cm.sum())
    acc = float(np.trace(cm)) / total if total else float("nan")
    ax.set_title(f"{title}\n{total:,} images, accuracy {acc:.2%} (counts; colour: share of the row)", fontsize=10)
    return save_figure(fig, path)
