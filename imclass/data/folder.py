"""Class-per-folder image trees (``root/<class>/<image>``) read into one uint8 tensor.

Two layouts are understood:

* a **split tree**: ``root/train/<class>/...`` plus ``root/test/<class>/...`` (or ``root/val/...``);
  the folders are the splits and the class list is the union of the class folders of all splits;
* a **plain tree**: ``root/<class>/...``; it is split reproducibly, 20% of each class held out as
  ``"test"`` and the rest as ``"train"`` (seed 0), or read whole with ``split="all"``.

Files are listed by the one folder walk (``imclass.data.walk``: symlinked folders read once, regular
files only, skipped entries named in one warning) and decoded by the one gate (``imclass.data.decode``:
JPEG, PNG, BMP, GIF, WebP, TIFF; pixel limit; EXIF orientation; 16-bit and float scaled) in a thread
pool, as RGB, or as one grey channel when every image is grey. Unreadable files are skipped with one
warning listing them (``strict=True`` makes that an error).
"""
from __future__ import annotations

import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from imclass.data.dataset import ImageDataset
from imclass.data.decode import (
    DEFAULT_MAX_PIXELS, GREY_MODES, IMAGE_EXTENSIONS, ImageError, decode_array, decode_image, probe_image,
)
from imclass.data.source import Decoder, ImageList, UnreadableImageError, open_images
from imclass.data.split import limit_indices, split_indices
from imclass.data.walk import ClassWalk, relative_name, take_paths, walk_classes

# Deferred imports (inside functions), for start-up time: tqdm.auto
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

TEST_FRACTION = 0.2  # share of each class held out as "test" in a plain tree
SPLIT_SEED = 0
_SHOWN = 10  # unreadable files named in a message before "... and N more"


HELD_OUT = "held-out"
HELD_OUT_NOTE = (f"held-out: the seeded {TEST_FRACTION:.0%} of each class of a folder without split folders, never "
                 "trained on; `imclass train` reports on them and `imclass evaluate RUN FOLDER` reads the same photos")


def split_word(dataset: str | os.PathLike, split: str) -> str:
    """The one word every command uses for ``split`` of ``dataset``: a plain folder's seeded hold-out (its
    ``test`` split, which a transfer run validates on) is ``HELD_OUT``; any other split keeps its name."""
    folder = Path(dataset).expanduser()
    if split in ("test", "val") and folder.is_dir() and not split_folders(folder) \
            and not (folder / "index.json").is_file():  # not shards (`imclass data shard`), which have their splits
        return HELD_OUT
    return {"val": "validation"}.get(split, split)


def parse_image_size(image_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``32`` -> ``(32, 32)``, ``(h, w)`` -> ``(h, w)``; None stays None. Rejects non-positive sizes."""
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    elif isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        size = (int(image_size[0]), int(image_size[1]))
    else:
        raise ValueError(f"expected image_size as an int or (height, width), received {image_size!r}")
    if min(size) < 1:
        raise ValueError(f"expected a positive image_size, received {image_size!r}")
    return size


def class_folders(path: Path) -> list[Path]:
    """The class sub-folders of ``path``, sorted (hidden ones and ``__pycache__``-like names left out)."""
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith((".", "__")))


def split_folders(root: Path) -> dict[str, Path]:
    """The split sub-folders of a split tree (``train`` plus ``test`` and/or ``val``), else ``{}``."""
    found = {name: root / name for name in ("train", "val", "test") if (root / name).is_dir()}
    return found if "train" in found and len(found) > 1 else {}


def folder_classes(root: Path) -> list[str]:
    """The class names of a class-per-folder tree: the class sub-folders of every split folder (sorted, all
    splits together) when it has them (``split_folders``), else its own class sub-folders."""
    splits = split_folders(root)
    if splits:
        return sorted({c.name for folder in splits.values() for c in class_folders(folder)})
    return [c.name for c in class_folders(root)]


def list_images(folder: Path, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    """Image files under ``folder/<class>/`` (searched recursively, sorted) and their class indices.

    Listed by ``imclass.data.walk.walk_classes``; entries it skips (symlink loops, FIFOs, other files)
    are named in one warning.
    """
    found = list_class_files(folder, classes)
    return found.paths, found.labels


def list_class_files(folder: Path, classes: Sequence[str]) -> ClassWalk:
    """``list_images`` with each file's ``(os.fspath(path), st_size, st_mtime_ns)`` from the walk
    (``ClassWalk.stats``: pass them to ``ImageList(stats=...)`` so that a cache key stats nothing again)."""
    found = walk_classes(folder, classes)
    message = found.message(folder)
    if message:
        warnings.warn(message, stacklevel=3)
    return found


def read_image(path: str | Path, size: tuple[int, int] | None = None, channels: int | None = None) -> torch.Tensor:
    """One image file as a uint8 tensor (C, H, W), e.g. to classify it with a trained model.

    ``channels`` 1 or 3 converts to grey or RGB (default: grey stays grey, anything else RGB);
    ``size`` (h, w) resizes. A missing or unreadable file raises a ValueError naming it.
    """
    return decode_image(path, size=size, channels=channels, name=str(path))  # ImageError is a ValueError


def _probe_size(path: Path) -> tuple[int, int] | str:
    """(height, width) from the file header (after EXIF orientation), without decoding the pixels."""
    try:
        info = probe_image(path, max_pixels=DEFAULT_MAX_PIXELS)
    except ImageError as err:
        return err.reason
    return info.height, info.width


def map_files(fn, items: list, workers: int | None, desc: str) -> list:
    """``fn`` over ``items`` on ``workers`` threads, in order, with a progress bar labelled ``desc``."""
    from tqdm.auto import tqdm

    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(fn, items), total=len(items), desc=desc, disable=None, leave=False))


def _report_bad(bad: list[tuple[Path, str]], root: Path, strict: bool) -> None:
    if not bad:
        return
    shown = "; ".join(f"{relative_name(p, root)} ({why})" for p, why in bad[:_SHOWN])
    more = f"; and {len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    message = f"{len(bad)} unreadable image file(s) in {root}: {shown}{more}"
    if strict:
        raise UnreadableImageError(message)
    warnings.warn(f"skipped {message} (pass strict=True to make this an error)", stacklevel=3)


def _size_error(sizes: list[tuple[int, int]], paths: list[Path], root: Path) -> ValueError:
    counts = Counter(sizes)
    example = {}
    for s, p in zip(sizes, paths):
        example.setdefault(s, p)
    listed = ", ".join(
        f"{h}x{w} ({n} file{'s' if n > 1 else ''}, e.g. {relative_name(example[(h, w)], root)})"
        for (h, w), n in counts.most_common(5)
    )
    more = f" and {len(counts) - 5} other sizes" if len(counts) > 5 else ""
    (h, w), _ = counts.most_common(1)[0]
    return ValueError(
        f"images in {root} have {len(counts)} different sizes (height x width): {listed}{more}; "
        f"pass image_size={h} or image_size=({h}, {w}) (--image-size on the command line) to resize them all"
    )


def folder_images(path: str | os.PathLike, split: str = "train", *, test_fraction: float = TEST_FRACTION,
                  seed: int = SPLIT_SEED, limit: int | None = None, limit_seed: int = 0) -> ImageList:
    """The image files of one split of a class-per-folder tree (see the module docstring), not decoded;
    ``limit``: a seeded (``limit_seed``), stratified sample of that many files of the split
    (:func:`imclass.data.split.limit_indices`, the rule of every ``--limit``)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"no such folder: {root}")
    splits = split_folders(root)
    classes = folder_classes(root)
    notes: list[str] = []
    if splits:
        if split == "test" and "test" not in splits:
            notes.append(f"{root} has no test/ folder: val/ is used as the test split")
            split_dir = splits["val"]
        elif split in splits:
            split_dir = splits[split]
        else:
            hint = " (use imclass.data.train_val_split on the train split)" if split == "val" else ""
            raise ValueError(
                f"{root} has split folders {', '.join(splits)}, received split={split!r}{hint}"
            )
        found = list_class_files(split_dir, classes)
        paths, labels, stats = found.paths, found.labels, found.stats
    else:
        found = list_class_files(root, classes)
        paths, labels, stats = found.paths, found.labels, found.stats
        if split in ("train", "test"):
            train_idx, test_idx = split_indices(torch.tensor(labels), test_fraction, seed=seed)
            chosen = (train_idx if split == "train" else test_idx).tolist()
            paths, labels, stats = take_paths(paths, chosen), [labels[i] for i in chosen], [stats[i] for i in chosen]
            notes.append(
                f"{split} split of a plain class-per-folder tree: "
                f"{test_fraction:.0%} of each class held out as test, the rest train (seed {seed})"
            )
        elif split != "all":
            raise ValueError(
                f"expected split 'train', 'test' or 'all' for a folder without train/ and test/ sub-folders "
                f"({root}), received split={split!r}"
                + (" (use imclass.data.train_val_split on the train split)" if split == "val" else "")
            )
        split_dir = root
    if not classes:
        raise ValueError(
            f"no class folders in {root}: expected one sub-folder per class holding "
            f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files"
        )
    if not paths:
        raise ValueError(
            f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in the class folders of {split_dir} for split {split!r}"
        )
    if limit is not None and limit < len(paths):
        pick = limit_indices(torch.tensor(labels), limit, seed=limit_seed, classes=classes, where=f"{split} split").tolist()
        paths, labels, stats = [paths[i] for i in pick], [labels[i] for i in pick], [stats[i] for i in pick]
        notes.append(f"--limit {limit}: a seeded (seed {limit_seed}), stratified sample of the split's files")
    return ImageList(paths, labels, classes, root, name=root.name, split=split, notes=notes, stats=stats)


def _is_grey(path: Path) -> bool:
    return probe_image(path, max_pixels=DEFAULT_MAX_PIXELS).mode in GREY_MODES


def folder_decoder(size: tuple[int, int] | None) -> Decoder:
    """How ``load`` decodes a folder's file at ``size`` (h, w) through the decoding gate
    (``imclass.data.decode``): grey kept grey (one channel when every file is grey)."""
    if size is None:
        raise ValueError("expected an image size (h, w) for the decoder")
    return Decoder(lambda p: decode_array(p, size=size, max_pixels=DEFAULT_MAX_PIXELS), size, "folder:decode-gate",
                   None, _is_grey)


def native_size(images: ImageList, *, strict: bool = False, workers: int | None = None) -> tuple[int, int]:
    """The one size (h, w) every file has, from the headers; a ValueError lists the sizes when they differ."""
    probed = map_files(_probe_size, images.paths, workers, "sizes")
    ok = [(p, r) for p, r in zip(images.paths, probed) if not isinstance(r, str)]
    if len({r for _, r in ok}) > 1:
        bad = [(p, r) for p, r in zip(images.paths, probed) if isinstance(r, str)]
        _report_bad(bad, images.root, strict)
        raise _size_error([r for _, r in ok], [p for p, _ in ok], images.root)
    if not ok:
        raise ValueError(f"none of the {len(images)} image files in {images.root} could be read")
    return ok[0][1]


DEFAULT_SIZE = 64  # a folder read without an image size: at most this many pixels a side


def default_image_size(path: str | os.PathLike, sample: int = 64) -> tuple[int, int]:
    """The size to read a folder at when none is given: its images' most common size (from the
    headers of an even sample of ``sample`` files) when neither side exceeds ``DEFAULT_SIZE``, else
    ``DEFAULT_SIZE`` x ``DEFAULT_SIZE`` (never the native size of large photos: 400x300 JPEGs
    would take 360 KB each)."""
    images = folder_images(path, "all" if not split_folders(Path(path).expanduser()) else "train")
    step = max(1, len(images) // sample)
    sizes = [s for s in (_probe_size(p) for p in images.paths[::step][:sample]) if not isinstance(s, str)]
    if sizes:
        (h, w), _ = Counter(sizes).most_common(1)[0]
        if max(h, w) <= DEFAULT_SIZE:
            return h, w
    return DEFAULT_SIZE, DEFAULT_SIZE


def load_folder(
    path: str | os.PathLike,
    split: str = "train",
    image_size: int | tuple[int, int] | None = None,
    *,
    strict: bool = False,
    test_fraction: float = TEST_FRACTION,
    seed: int = SPLIT_SEED,
    workers: int | None = None,
    limit: int | None = None,
    limit_seed: int = 0,
    mode: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    verbose: bool = True,
    reserve: int | None = None,
) -> ImageDataset:
    """Read one split of a class-per-folder image tree (see the module docstring for the layouts).

    ``limit``: decode only a seeded (``limit_seed``), stratified sample of that many files of the split
    (:func:`imclass.data.split.limit_indices`, the rule of every ``--limit``).
    ``mode`` is the tier (``imclass.data.source``: ``"memory"``, ``"cache"``, ``"stream"``; None
    chooses from the headers and the memory available once ``reserve`` bytes are kept for the model
    (``imclass.data.source.model_reserve``), and says so on stderr when ``verbose``).
    Each file is decoded straight into its row of one preallocated uint8 tensor (or of the
    memory-mapped cache file). Without ``image_size`` every image must have the same size.
    """
    images = folder_images(path, split, test_fraction=test_fraction, seed=seed, limit=limit, limit_seed=limit_seed)
    size = parse_image_size(image_size)
    if size is None:
        native = native_size(images, strict=strict, workers=workers)
        decoder = Decoder(lambda p: decode_array(p, max_pixels=DEFAULT_MAX_PIXELS), native, "folder:decode-gate:native",
                          None, _is_grey)
    else:
        decoder = folder_decoder(size)
    return open_images(images, decoder, mode, cache_dir=cache_dir, strict=strict, workers=workers, verbose=verbose,
                       reserve=reserve)
