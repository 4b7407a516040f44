"""What every ``imclass train`` leaves in its run folder beside the model files: a fresh folder per run
(``runs/x`` -> ``runs/x-2``), history.csv, the two-panel training curves and the confusion matrix on the
held-out split (the pictures are drawn by :mod:`imclass.visualize.training`).

Used by both training workflows (``imclass.workflows.training`` for registry models and the fast recipe,
``imclass.transfer.workflow`` for pretrained backbones), so a run folder looks the same whichever ran.
"""
from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from imclass.confident import find_label_issues
from imclass.visualize.training import save_confusion_matrix, save_curves

# Deferred imports (inside functions), for start-up time: torch, torch.nn.functional
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["BEST_FILE", "CONFUSION_FILE", "CURVES_FILE", "HISTORY_FILE", "LAST_FILE", "MODEL_FILE", "fresh_run_dir",
           "held_out_figures", "link_or_copy", "save_confusion_matrix", "save_curves", "write_history"]

MODEL_FILE = "model.safetensors"  # the default model of a run: what imclass.load(run) reads
BEST_FILE = "best.safetensors"  # best by validation accuracy (model.safetensors, the default, is the same file)
LAST_FILE = "last.safetensors"  # the weights at the last epoch
HISTORY_FILE = "history.csv"
CURVES_FILE = "curves.png"
CONFUSION_FILE = "confusion_matrix.png"


def fresh_run_dir(out: str | os.PathLike, *, exist_ok: bool = False, resume: bool = False) -> Path:
    """The folder a new run writes to: ``out`` itself when it does not exist yet, is empty, ``exist_ok``
    (overwrite) or ``resume`` (continue it); else the first free ``out-2``, ``out-3``, ... (as Ultralytics
    does), so an earlier run is never overwritten silently."""
    out = Path(out)
    if resume or exist_ok or not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return out
    n = 2
    while True:
        candidate = out.with_name(f"{out.name}-{n}")
        if not candidate.exists() or (candidate.is_dir() and not any(candidate.iterdir())):
            return candidate
        n += 1


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes the same file as ``source`` (a hard link: no extra disk), or a copy where the
    file system has no hard links. Atomic: ``target`` is replaced, never half-written."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def write_history(history: Mapping[str, Sequence[Any]], path: str | os.PathLike) -> Path:
    """``history`` (a dict of per-epoch lists, as ``History.to_dict()``) as a CSV file, one row per epoch."""
    path = Path(path)
    keys = list(history)
    rows = max((len(v) for v in history.values()), default=0)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        for i in range(rows):
            writer.writerow([history[k][i] if i < len(history[k]) else "" for k in keys])
    return path


def held_out_figures(clf, data, tta: Any = None) -> dict[str, Any]:
    """Accuracy, the plain cross-entropy loss (no label smoothing: the figure ``imclass evaluate`` prints)
    and the confusion matrix of ``clf`` on ``data`` (an ``ImageDataset`` or any ``ImageSource``), from one
    pass over the images."""
    import torch
    import torch.nn.functional as F

    if hasattr(data, "images"):  # in memory (or memory-mapped)
        logits, labels = clf.predict_logits(data.images, tta=tta).float(), data.labels
    else:  # a streamed source (imclass.data.source.ImageSource): batch by batch
        parts = [(clf.predict_logits(x, tta=tta).float(), y) for x, y in data.batches(256)]
        logits, labels = torch.cat([p for p, _ in parts]), torch.cat([y for _, y in parts])
    if logits.shape[1] == 1:  # one sigmoid output
        predicted = (logits[:, 0] > 0).long()
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], labels.float()).item()
    else:
        predicted = logits.argmax(1)
        loss = F.cross_entropy(logits, labels).item()
    n = max(len(data.classes), int(labels.max()) + 1 if len(labels) else 0)
    cm = torch.bincount(labels * n + predicted, minlength=n * n).reshape(n, n)
    return {"accuracy": (predicted == labels).double().mean().item(), "loss": loss, "confusion_matrix": cm,
            "n": len(labels), "suspected_label_errors": _suspected(logits, labels, n)}


def _suspected(logits, labels, n: int) -> int | None:
    """How many of these held-out images confident learning (``imclass.confident``) finds mislabelled: the
    model never trained on them, so its probabilities are out of sample (``imclass review`` lists them)."""
    if logits.shape[1] < 2 or logits.shape[1] != n or not len(labels):
        return None
    return len(find_label_issues(logits.softmax(1).double().numpy(), labels.numpy()).indices)
