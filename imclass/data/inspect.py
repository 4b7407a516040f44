"""Describe a folder of images from the file headers alone: layout, splits, per-class counts,
formats, colour modes and the distribution of image sizes.

Nothing is decoded, so a folder of mixed sizes and formats (a user's own photos) is described in a
second or two instead of failing the way loading it without ``image_size`` does.

    info = inspect_folder("photos")          # a dict, JSON-ready
    info["sizes"]["distinct"], info["formats"], info["splits"]["train"]["class_counts"]
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from imclass.data.decode import DEFAULT_MAX_PIXELS, GREY_MODES, IMAGE_EXTENSIONS, ImageError, probe_image
from imclass.data.folder import SPLIT_SEED, TEST_FRACTION, class_folders, map_files, split_folders
from imclass.data.split import split_indices
from imclass.data.walk import relative_name, skip_message, walk_classes


__all__ = ["FileRecord", "folder_files", "inspect_folder", "probe"]


class FileRecord(dict):
    """One image file of a folder: ``path``, ``split``, ``label`` (class index), and after :func:`probe`
    ``format``, ``mode``, ``height``, ``width``, ``bytes`` or ``error``."""


def folder_files(path: str | os.PathLike, *, report: Callable[[str], None] | None = None,
                 ) -> tuple[str, dict[str, Path], list[str], list[FileRecord]]:
    """The image files of a class-per-folder tree: ``(layout, split folders, classes, records)``.

    ``layout`` is ``"split"`` (``train/`` plus ``val/`` and/or ``test/``) or ``"plain"`` (one
    sub-folder per class, ``split`` is ``"all"``). Raises a ValueError naming the folder when it
    holds no class folders or no image files. Files are listed by ``imclass.data.walk``; the one
    line naming what it skipped goes to ``report`` (default: a warning).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    splits = split_folders(root)
    if splits:
        layout = "split"
        classes = sorted({c.name for folder in splits.values() for c in class_folders(folder)})
    else:
        layout, splits = "plain", {"all": root}
        classes = [c.name for c in class_folders(root)]
    if not classes:
        raise ValueError(
            f"no class folders in {root}: expected one sub-folder per class holding "
            f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files"
        )
    records: list[FileRecord] = []
    skipped: list = []
    for split, folder in splits.items():
        found = walk_classes(folder, classes)
        records += [FileRecord(path=p, split=split, label=y) for p, y in zip(found.paths, found.labels)]
        skipped += found.skipped
    if skipped:
        message = skip_message(skipped, root)
        if report is None:
            warnings.warn(message, stacklevel=2)
        else:
            report(message)
    if not records:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {root}")
    return layout, splits, classes, records


def probe(record: FileRecord) -> FileRecord:
    """Fill ``format``, ``mode``, ``height``, ``width`` (after EXIF orientation) and ``bytes`` from the file
    header (no decoding, ``imclass.data.decode.probe_image``), or ``error`` when the gate refuses the file
    (not an accepted format, more pixels than the limit, corrupt header)."""
    try:
        record["bytes"] = os.path.getsize(record["path"])
        info = probe_image(record["path"], max_pixels=DEFAULT_MAX_PIXELS)
        record.update(format=info.format, mode=info.mode, width=info.width, height=info.height)
    except ImageError as err:  # reported per file, never raised
        record["error"] = err.reason
    except OSError as err:
        record["error"] = f"cannot read the file ({err.strerror or type(err).__name__})"
    return record


def _size_summary(records: list[FileRecord]) -> dict[str, Any]:
    """Min / median / max of height and width, the distinct sizes and the most common ones."""
    ok = [r for r in records if "error" not in r]
    if not ok:
        return {"distinct": 0}
    h = np.array([r["height"] for r in ok])
    w = np.array([r["width"] for r in ok])
    sizes = Counter(zip(h.tolist(), w.tolist()))
    aspect = w / h

    def stats(a: np.ndarray) -> dict[str, float]:
        return {"min": int(a.min()), "median": float(np.median(a)), "max": int(a.max())}

    return {
        "distinct": len(sizes),
        "height": stats(h),
        "width": stats(w),
        "aspect_ratio": {"min": float(aspect.min()), "median": float(np.median(aspect)), "max": float(aspect.max())},
        "most_common": [{"height": a, "width": b, "count": n} for (a, b), n in sizes.most_common(5)],
    }


def _split_summary(records: list[FileRecord], classes: list[str]) -> dict[str, Any]:
    labels = [r["label"] for r in records]
    counts = np.bincount(np.array(labels, dtype=np.int64), minlength=len(classes)).tolist() if labels else [0] * len(classes)
    ok = [r for r in records if "error" not in r]
    sizes = {(r["height"], r["width"]) for r in ok}
    grey = bool(ok) and all(r["mode"] in GREY_MODES for r in ok)
    shape = [1 if grey else 3, *next(iter(sizes))] if len(sizes) == 1 else None
    return {"size": len(records), "classes": list(classes), "class_counts": counts, "image_shape": shape,
            "sizes": _size_summary(records)}


def inspect_folder(path: str | os.PathLike, *, workers: int | None = None, test_fraction: float = TEST_FRACTION,
                   seed: int = SPLIT_SEED) -> dict[str, Any]:
    """Describe an image folder from its file headers (see the module docstring); a JSON-ready dict.

    Keys: ``name``, ``source``, ``layout`` (``"split"`` or ``"plain"``), ``classes``, ``class_counts``
    (all files), ``size``, ``formats`` (``{"JPEG": n, ...}``), ``modes``, ``bytes``, ``sizes`` (size
    distribution), ``unreadable`` (``[{"path", "error"}]``), ``splits`` (per split: ``size``,
    ``class_counts``, ``image_shape`` when all images share one size, else None, and ``sizes``) and
    ``notes``. A plain tree is described as the ``train``/``test`` splits that ``imclass.data.load``
    makes of it (``test_fraction`` of each class, ``seed``).
    """
    root = Path(path).expanduser()
    notes: list[str] = []
    layout, _, classes, records = folder_files(root, report=notes.append)
    records = map_files(probe, records, workers, "headers")
    if layout == "plain":
        labels = torch.tensor([r["label"] for r in records])
        train_idx, test_idx = split_indices(labels, test_fraction, seed=seed)
        by_split = {"train": [records[i] for i in train_idx.tolist()], "test": [records[i] for i in test_idx.tolist()]}
        notes.append(f"no train/ and val/ (or test/) folders: imclass holds out {test_fraction:.0%} of each class "
                     f"as the held-out split (--split test), the rest is train (seed {seed})")
    else:
        by_split = {}
        for r in records:
            by_split.setdefault(r["split"], []).append(r)
    ok = [r for r in records if "error" not in r]
    summary = _size_summary(records)
    if summary["distinct"] > 1:
        notes.append(f"images have {summary['distinct']} different sizes: training resizes them to one "
                     "input size (--image-size)")
    total = np.bincount(np.array([r["label"] for r in records]), minlength=len(classes)).tolist()
    return {
        "name": root.name,
        "source": str(root),
        "layout": layout,
        "classes": list(classes),
        "class_counts": total,
        "size": len(records),
        "formats": dict(Counter(r["format"] for r in ok).most_common()),
        "modes": dict(Counter(r["mode"] for r in ok).most_common()),
        "bytes": int(sum(r.get("bytes", 0) for r in records)),
        "sizes": summary,
        "unreadable": [{"path": relative_name(r["path"], root), "error": r["error"]} for r in records if "error" in r],
        "splits": {s: _split_summary(rs, classes) for s, rs in by_split.items()},
        "notes": notes,
    }
