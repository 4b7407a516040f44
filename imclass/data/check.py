"""Find problems in a folder of images before training on it; nothing is changed or deleted.

``check_folder(path)`` decodes every file once (JPEGs at a reduced scale via Pillow's draft mode),
computes the perceptual hash of a 32x32 grey thumbnail (only the 64-bit hash and the SHA-256 of the file's bytes are kept), and reports:

* unreadable files (not an image, truncated, empty);
* exact duplicates (identical bytes) and near duplicates (perceptual hash within
  ``near_distance`` bits: resized, re-encoded or slightly edited copies), each group labelled
  ``within class``, ``across classes`` (one picture, two labels) or ``across splits``
  (the same picture in train and val/test: leakage, the validation figure is optimistic);
* files whose format or colour mode is rare in the folder, images whose size or aspect ratio is far
  from the median, tiny images;
* class imbalance (largest / smallest class) and empty class folders.

The perceptual hash is pHash: the signs of the 8x8 lowest-frequency 2-D DCT coefficients of the
32x32 grey thumbnail against their median (64 bits; unrelated photos differ in about 32).
:func:`quick_check` runs the same hash on data already loaded as tensors, which is what
``imclass train`` does at start to warn about duplicates and leakage for free.
"""
from __future__ import annotations

import hashlib
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from imclass.data.decode import DEFAULT_MAX_PIXELS, GREY_MODES, ImageError, decode_array, probe_image
from imclass.data.folder import map_files
from imclass.data.folder import SPLIT_SEED, TEST_FRACTION
from imclass.data.hamming import near_pairs
from imclass.data.inspect import FileRecord, folder_files
from imclass.data.split import split_indices
from imclass.data.walk import relative_name

__all__ = ["CheckOptions", "check_folder", "format_report", "hamming_pairs", "image_hashes", "pack_hashes",
           "perceptual_hash", "quick_check"]

THUMB = 32  # side of the grey thumbnail the hash is computed from
_HASH_BITS = 8  # 8x8 DCT coefficients -> 64 bits


@dataclass
class CheckOptions:
    """Thresholds of :func:`check_folder` (all reported in its output)."""

    near_distance: int = 6  # near duplicates: pHash Hamming distance <= this many of 64 bits
    tiny: int = 32  # images with a side shorter than this many pixels
    size_factor: float = 4.0  # area this many times larger or smaller than the median
    aspect_factor: float = 2.5  # aspect ratio this many times wider or narrower than the median
    rare_share: float = 0.05  # a format or colour mode held by fewer than this share of the files
    imbalance: float = 3.0  # largest class / smallest class above this ratio

    def __post_init__(self) -> None:
        if not 0 <= self.near_distance < 32:
            raise ValueError(f"expected 0 <= near_distance < 32, received near_distance={self.near_distance}")
        if self.tiny < 1:
            raise ValueError(f"expected tiny >= 1, received tiny={self.tiny}")
        for name in ("size_factor", "aspect_factor", "imbalance"):
            if not getattr(self, name) > 1:
                raise ValueError(f"expected {name} > 1, received {name}={getattr(self, name)}")
        if not 0 < self.rare_share < 0.5:
            raise ValueError(f"expected 0 < rare_share < 0.5, received rare_share={self.rare_share}")


# ------------------------------------------------------------------------------ hashing

def _dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix (n, n): ``D @ x`` transforms the columns of x."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d


_DCT_LOW = torch.kron(_dct_matrix(THUMB)[:_HASH_BITS], _dct_matrix(THUMB)[:_HASH_BITS]).float()  # (64, 1024)


def perceptual_hash(grey: torch.Tensor) -> torch.Tensor:
    """pHash of grey 32x32 thumbnails (N, 32, 32) (uint8 or float): (N, 64) bool bits.

    A row's hash does not depend on the other rows (checked on 5,000 CIFAR-10 images one by one and
    all at once), except for flat images, whose coefficients are all rounding noise."""
    if grey.ndim != 3 or tuple(grey.shape[1:]) != (THUMB, THUMB):
        raise ValueError(f"expected grey thumbnails of shape (N, {THUMB}, {THUMB}), received {tuple(grey.shape)}")
    x = grey.to(torch.float32).reshape(len(grey), -1)  # (N, 32, 32) -> (N, 1024)
    coeffs = x @ _DCT_LOW.T  # the 8x8 lowest frequencies of D @ x @ D.T, flattened: (N, 64)
    median = coeffs[:, 1:].median(dim=1, keepdim=True).values  # the DC term (mean brightness) left out
    return coeffs > median


def image_hashes(images: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """pHash bits (N, 64) of uint8 images (N, C, H, W) already in memory (any size, grey or RGB), a chunk at
    a time (``images`` may be a memory-mapped tensor: only ``chunk`` images are in memory at once)."""
    out = []
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].cpu()
        if x.shape[-2:] != (THUMB, THUMB):  # shrink the uint8 pixels first (torch's fast path): the rest costs nothing
            x = F.interpolate(x, size=(THUMB, THUMB), mode="bilinear", antialias=True, align_corners=False)
        x = x.float()
        grey = (x * weights).sum(1) if x.shape[1] == 3 else x.mean(1)  # (n, C, 32, 32) -> (n, 32, 32)
        out.append(perceptual_hash(grey.round()))
    return torch.cat(out) if out else torch.zeros((0, _HASH_BITS * _HASH_BITS), dtype=torch.bool)


def pack_hashes(bits: torch.Tensor) -> np.ndarray:
    """(N, 64) bool hash bits -> (N,) uint64, the first bit the most significant."""
    return np.packbits(bits.numpy().astype(np.uint8), axis=1).view(">u8").ravel().astype(np.uint64)


def hamming_pairs(bits: torch.Tensor | np.ndarray, max_distance: int, other: torch.Tensor | np.ndarray | None = None,
                  ) -> list[tuple[int, int, int]]:
    """Pairs ``(i, j, distance)`` of hashes at most ``max_distance`` bits apart, sorted by ``i`` then ``j``.

    Within ``bits`` (i < j), or between ``bits`` (i) and ``other`` (j) when given. Hashes are (N, 64)
    bool bits or (N,) packed uint64. Found by multi-index hashing (:func:`imclass.data.hamming.near_pairs`):
    no step compares every pair, and memory stays O(N) plus the pairs found.
    """
    def packed(h):
        return pack_hashes(h) if isinstance(h, torch.Tensor) else np.asarray(h, dtype=np.uint64)

    i, j, d = near_pairs(packed(bits), max_distance, None if other is None else packed(other))
    return list(zip(i.tolist(), j.tolist(), d.tolist()))


# ------------------------------------------------------------------------------ reading files

def _read(record: FileRecord) -> FileRecord:
    """Header facts, SHA-256 of the bytes and the perceptual hash of one file (``error`` on failure), through
    the decoding gate (``imclass.data.decode``: JPEGs drafted down to the thumbnail). Only the 64-bit hash
    is kept, not the thumbnail."""
    try:
        raw = Path(record["path"]).read_bytes()
        record["bytes"] = len(raw)
        record["sha256"] = hashlib.sha256(raw).hexdigest()
        info = probe_image(raw, name=str(record["path"]), max_pixels=DEFAULT_MAX_PIXELS)
        record.update(format=info.format, mode=info.mode, width=info.width, height=info.height)
        thumb = decode_array(raw, mode="L", size=(THUMB, THUMB), name=str(record["path"]))  # (32, 32)
        record["phash"] = int(pack_hashes(perceptual_hash(torch.from_numpy(thumb).unsqueeze(0)))[0])
    except ImageError as err:  # every bad file is reported, none raises
        record["error"] = err.reason
    except OSError as err:
        record["error"] = f"cannot read the file ({err.strerror or type(err).__name__})"
    return record


# ------------------------------------------------------------------------------ findings

def _part(m: FileRecord) -> str:
    """The split a file ends in when imclass reads the folder (a plain tree's part is the seeded hold-out)."""
    return m.get("part", m["split"])


def _kind(members: Sequence[FileRecord]) -> str:
    if len({_part(m) for m in members}) > 1:
        return "across splits"
    if len({m["label"] for m in members}) > 1:
        return "across classes"
    return "within class"


def _group(members: Sequence[FileRecord], root: Path, classes: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "kind": _kind(members),
        "files": [relative_name(m["path"], root) for m in members],
        "classes": [classes[m["label"]] for m in members],
        "splits": [_part(m) for m in members],
        "labels_differ": len({m["label"] for m in members}) > 1,
        **extra,
    }


def _duplicates(ok: list[FileRecord], root: Path, classes: list[str], near: int):
    """Exact duplicate groups (same bytes) and near-duplicate pairs (one file per exact group)."""
    by_hash: dict[str, list[FileRecord]] = {}
    for r in ok:
        by_hash.setdefault(r["sha256"], []).append(r)
    exact = [_group(g, root, classes) for g in by_hash.values() if len(g) > 1]
    reps = [g[0] for g in by_hash.values()]
    nearby = []
    if len(reps) > 1:
        hashes = np.array([r["phash"] for r in reps], dtype=np.uint64)
        for i, j, d in hamming_pairs(hashes, near):
            nearby.append(_group([reps[i], reps[j]], root, classes, distance=d))
    nearby.sort(key=lambda g: (g["distance"], g["files"]))
    return exact, nearby


def _rare(ok: list[FileRecord], root: Path, share: float) -> list[dict[str, Any]]:
    """Files whose format, or colour kind (grey / colour), only a few files of the folder have."""
    found = []
    for key, describe in (("format", lambda r: r["format"]),
                          ("colour", lambda r: "grey" if r["mode"] in GREY_MODES else "colour")):
        counts = Counter(describe(r) for r in ok)
        if len(counts) < 2:
            continue
        common = counts.most_common(1)[0][0]
        for value, n in counts.items():
            if n < share * len(ok):
                for r in ok:
                    if describe(r) == value:
                        found.append({"path": relative_name(r["path"], root), key: value, "mode": r["mode"],
                                      "why": f"{key} {value}: {n} of {len(ok)} files (most are {common})"})
    return sorted(found, key=lambda f: f["path"])


def _sizes(ok: list[FileRecord], root: Path, opt: CheckOptions):
    """(tiny images, images whose area or aspect ratio is far from the median)."""
    tiny = [{"path": relative_name(r["path"], root), "height": r["height"], "width": r["width"]}
            for r in ok if min(r["height"], r["width"]) < opt.tiny]
    rest = [r for r in ok if min(r["height"], r["width"]) >= opt.tiny]
    far = []
    if len(rest) >= 3:
        area = np.median([r["height"] * r["width"] for r in rest])
        aspect = np.median([r["width"] / r["height"] for r in rest])
        for r in rest:
            a, s = r["height"] * r["width"] / area, r["width"] / r["height"] / aspect
            why = []
            if a > opt.size_factor or a < 1 / opt.size_factor:
                why.append(f"area {a:.2g}x the median")
            if s > opt.aspect_factor or s < 1 / opt.aspect_factor:
                why.append(f"aspect ratio {r['width'] / r['height']:.2f} (median {aspect:.2f})")
            if why:
                far.append({"path": relative_name(r["path"], root), "height": r["height"], "width": r["width"],
                            "why": ", ".join(why)})
    return sorted(tiny, key=lambda f: f["path"]), sorted(far, key=lambda f: f["path"])


def _imbalance(counts: list[int], classes: list[str], ratio: float) -> dict[str, Any] | None:
    present = [c for c in counts if c > 0]
    if not present:
        return None
    largest, smallest = max(present), min(present)
    if largest / smallest <= ratio:
        return None
    return {"ratio": largest / smallest, "largest": classes[counts.index(largest)],
            "smallest": classes[counts.index(smallest)],
            "minority": [c for c, n in zip(classes, counts) if 0 < n and n * ratio < largest],
            "counts": dict(zip(classes, counts))}


def check_folder(path: str | os.PathLike, options: CheckOptions | None = None, *,
                 workers: int | None = None) -> dict[str, Any]:
    """Check an image folder (a ``train/`` + ``val/``/``test/`` tree or a class-per-folder tree).

    Returns a JSON-ready report: ``source``, ``layout``, ``images``, ``classes``, ``class_counts``
    (of the training split in a split tree, else of all files), the findings ``unreadable``,
    ``exact_duplicates``, ``near_duplicates``, ``rare_formats``, ``size_outliers``, ``tiny``,
    ``imbalance`` (None when balanced), ``empty_classes``, ``skipped`` (the one line naming entries the
    folder walk skipped, or None), then ``summary`` (count per finding),
    ``options`` and ``seconds``. Paths are relative to the folder. Nothing is modified.
    """
    opt = options or CheckOptions()
    start = time.perf_counter()
    root = Path(path).expanduser()
    skipped: list[str] = []
    layout, splits, classes, records = folder_files(root, report=skipped.append)
    if layout == "plain":  # the parts `imclass train` / `imclass.data.load` make of a plain tree: same rule, same seed
        _, held = split_indices(torch.tensor([r["label"] for r in records]), TEST_FRACTION, seed=SPLIT_SEED)
        held_set = set(held.tolist())
        for i, r in enumerate(records):
            r["part"] = "test" if i in held_set else "train"
    records = map_files(_read, records, workers, "checking")
    ok = [r for r in records if "error" not in r]
    exact, near = _duplicates(ok, root, classes, opt.near_distance)
    tiny, far = _sizes(ok, root, opt)
    counted_split = "train" if layout == "split" else "all"
    counts = np.bincount(np.array([r["label"] for r in records if r["split"] == counted_split], dtype=np.int64),
                         minlength=len(classes)).tolist()
    present = {(r["split"], r["label"]) for r in records}  # one pass: classes x files would grow as N^2 with ImageNet
    empty = [f"{s}/{c}" if layout == "split" else c for s in splits for i, c in enumerate(classes)
             if (s, i) not in present]
    report = {
        "source": str(root),
        "layout": layout,
        "images": len(records),
        "classes": list(classes),
        "class_counts": counts,
        "unreadable": [{"path": relative_name(r["path"], root), "error": r["error"]} for r in records if "error" in r],
        "exact_duplicates": exact,
        "near_duplicates": near,
        "rare_formats": _rare(ok, root, opt.rare_share),
        "size_outliers": far,
        "tiny": tiny,
        "imbalance": _imbalance(counts, classes, opt.imbalance),
        "empty_classes": empty,
        "skipped": skipped[0] if skipped else None,
    }
    report["summary"] = _summary(report)
    report["options"] = asdict(opt)
    report["seconds"] = time.perf_counter() - start
    return report


FINDINGS = ("unreadable", "exact_duplicates", "near_duplicates", "rare_formats", "size_outliers", "tiny",
            "imbalance", "empty_classes")


def _summary(report: dict[str, Any]) -> dict[str, int]:
    out = {}
    for key in FINDINGS:
        value = report[key]
        out[key] = (0 if value is None else 1) if key == "imbalance" else len(value)
    for key in ("exact_duplicates", "near_duplicates"):
        kinds = Counter(g["kind"] for g in report[key])
        for kind in ("within class", "across classes", "across splits"):
            out[f"{key}.{kind.replace(' ', '_')}"] = kinds.get(kind, 0)
        out[f"{key}.labels_differ"] = sum(1 for g in report[key] if g.get("labels_differ"))
    return out


def _files(group: dict[str, Any]) -> str:
    """A group's files, each with its split unless its path already starts with it (a split tree)."""
    return "  ".join(f if f.startswith(f"{sp}/") else f"{f} ({sp})" for f, sp in zip(group["files"], group["splits"]))


def format_report(report: dict[str, Any], shown: int = 5) -> str:
    """The report as a table (finding, count, examples) and the details of each finding."""
    s = report["summary"]
    lines = [f"{report['source']}: {report['images']:,} images, {len(report['classes'])} classes, "
             f"{report['layout']} tree, checked in {report['seconds']:.1f} s (nothing was changed)", ""]

    def kinds(key: str) -> str:
        parts = [f"{s[f'{key}.{k}']} {k.replace('_', ' ')}" for k in ("within_class", "across_classes", "across_splits")
                 if s[f"{key}.{k}"]]
        if s.get(f"{key}.labels_differ"):
            parts.append(f"{s[f'{key}.labels_differ']} with different labels")
        return ", ".join(parts)

    imb = report["imbalance"]
    rows = [
        ("unreadable files", s["unreadable"], ""),
        ("exact duplicate groups", s["exact_duplicates"], kinds("exact_duplicates")),
        (f"near duplicate pairs (<= {report['options']['near_distance']} bits)", s["near_duplicates"],
         kinds("near_duplicates")),
        ("rare format or colour", s["rare_formats"], ""),
        ("size or aspect far from median", s["size_outliers"], ""),
        (f"tiny (side < {report['options']['tiny']} px)", s["tiny"], ""),
        ("class imbalance", f"{imb['ratio']:.1f}x" if imb else "no", f"minority: {', '.join(imb['minority'])}" if imb else ""),
        ("empty class folders", s["empty_classes"], ""),
    ]
    width = max(len(r[0]) for r in rows) + 2
    lines.append("  " + "finding".ljust(width) + f"{'count':>7}  details")
    lines += ["  " + name.ljust(width) + f"{count:>7}  {detail}".rstrip() for name, count, detail in rows]

    def more(items: list, render) -> None:
        lines.extend("    " + render(item) for item in items[:shown])
        if len(items) > shown:
            lines.append(f"    ... and {len(items) - shown} more (--json lists all)")

    sections = [
        ("unreadable", lambda r: f"{r['path']}: {r['error']}"),
        ("exact_duplicates", lambda g: f"[{g['kind']}] " + _files(g)),
        ("near_duplicates", lambda g: f"[{g['kind']}, {g['distance']} bits] " + _files(g)),
        ("rare_formats", lambda r: f"{r['path']}: {r['why']}"),
        ("size_outliers", lambda r: f"{r['path']} {r['height']}x{r['width']}: {r['why']}"),
        ("tiny", lambda r: f"{r['path']} {r['height']}x{r['width']}"),
        ("empty_classes", lambda c: c),
    ]
    for key, render in sections:
        if report[key]:
            lines += ["", f"{key.replace('_', ' ')}:"]
            more(report[key], render)
    if report.get("skipped"):
        lines += ["", f"not read: {report['skipped']}"]
    if imb:
        lines += ["", "class counts: " + ", ".join(f"{c} {n:,}" for c, n in imb["counts"].items())
                  + "  (train with --class-weight balanced or --sampler balanced)"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ at train start

def quick_check(train: Any, test: Any = None, *, near_distance: int = 2, imbalance: float = 3.0,
                name: str = "the data") -> list[str]:
    """Warnings about data already loaded as ``ImageDataset`` s, from their pixels alone (no files read):
    near-identical images with different labels in ``train``, images of ``test`` that are in
    ``train`` (leakage) and class imbalance in ``train``. Cheap: a 64-bit hash per image, pairs found by an
    index (no step compares every pair); a memory-mapped set is hashed a chunk at a time. A stream-tier
    source (no ``images``) is not read twice: one message says the check was skipped."""
    messages = []
    if not hasattr(train, "images") or (test is not None and len(test) and not hasattr(test, "images")):
        return [f"the stream tier reads {name} batch by batch: the train-time duplicate and leakage check is "
                "skipped (imclass data check FOLDER runs it without holding the images)"]
    bits = image_hashes(train.images)
    pairs = hamming_pairs(bits, near_distance)
    conflicts = [(i, j) for i, j, _ in pairs if int(train.labels[i]) != int(train.labels[j])]
    same = len(pairs) - len(conflicts)
    if conflicts:
        messages.append(f"{len(conflicts)} pair(s) of (near) identical training images of {name} carry different labels")
    if same:
        messages.append(f"{same} pair(s) of (near) identical training images of {name} in the same class")
    if test is not None and len(test):
        leaks = hamming_pairs(image_hashes(test.images), near_distance, other=bits)
        leaked = len({i for i, _, _ in leaks})
        if leaked:
            messages.append(f"{leaked} of the {len(test):,} {test.split or 'test'} images of {name} are (near) identical "
                            "to training images: leakage, the held-out accuracy is optimistic")
    counts = torch.bincount(train.labels, minlength=len(train.classes)).tolist()
    imb = _imbalance(counts, list(train.classes), imbalance)
    if imb:
        messages.append(f"class imbalance in {name}: {imb['largest']} has {imb['ratio']:.1f}x the images of "
                        f"{imb['smallest']}; consider --class-weight balanced or --sampler balanced")
    source = str(getattr(train, "source", "") or "")
    if source and Path(source).is_dir():  # every finding about files: data check names them
        messages = [m if m.startswith("class imbalance") else f"{m} (imclass data check {train.source} lists the files)"
                    for m in messages]
    return messages
