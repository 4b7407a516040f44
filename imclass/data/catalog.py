"""``load``: a data set by name (CIFAR-10, MNIST, Fashion-MNIST) or from a folder; ``from_arrays``.

Known data sets are read from ``<root>/<name>/`` (root: ``root=``, else ``$IMCLASS_DATA``, else
``~/.cache/imclass``) and downloaded there from the official URLs when missing.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from imclass.data import cifar, download as dl
from imclass.data.arrays import as_images, as_labels
from imclass.data.dataset import ImageDataset
from imclass.data.folder import load_folder, parse_image_size
from imclass.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx
from imclass.data.shards import ShardSet, ShardSource
from imclass.data.split import limit_dataset

CLASSES: dict[str, list[str]] = {
    "cifar10": list(cifar.CLASSES),
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
}
OFFICIAL_SIZES: dict[str, dict[str, int]] = {
    "cifar10": {"train": 50_000, "test": 10_000},
    "mnist": {"train": 60_000, "test": 10_000},
    "fashion-mnist": {"train": 60_000, "test": 10_000},
}
_ALIASES = {"cifar-10": "cifar10", "cifar_10": "cifar10", "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist"}
_IDX_PREFIX = {"train": "train", "test": "t10k"}

# (name, split, file, mtime, size) -> (images, labels, classes, source): repeated loads skip the decompression
_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor, list[str], str]] = {}
_WARNED: set[str] = set()


def names() -> list[str]:
    """The data sets ``load`` knows by name."""
    return list(CLASSES)


FOLDER_IMAGE_SIZE = 32  # a folder of photos read as raw pixels (k-NN) or by a network trained from scratch


def scratch_image_size(name: str | os.PathLike, image_size: int | None) -> int | None:
    """The side a raw-pixel k-NN or a network trained from scratch reads data set ``name`` at:
    ``image_size`` when given; a folder of photos (mixed sizes): ``FOLDER_IMAGE_SIZE`` (CIFAR-10's
    32); a named data set: None (its own size)."""
    if image_size is not None or canonical_name(str(name)) is not None:
        return image_size
    return FOLDER_IMAGE_SIZE if Path(name).expanduser().is_dir() else None


def canonical_name(name: str) -> str | None:
    """``"CIFAR-10"`` -> ``"cifar10"``; None when ``name`` is not a known data set."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in CLASSES else None


def clear_cache() -> None:
    """Forget the data sets kept in memory by earlier ``load`` calls."""
    _CACHE.clear()


def load(
    name_or_path: str | os.PathLike,
    split: str = "train",
    root: str | os.PathLike | None = None,
    image_size: int | tuple[int, int] | None = None,
    *,
    download: bool = True,
    strict: bool = False,
    limit: int | None = None,
    seed: int = 0,
    mode: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    verbose: bool = True,
    reserve: int | None = None,
) -> ImageDataset:
    """Load one split of a data set as an ``ImageDataset`` (uint8 images (N, C, H, W), int64 labels).

    ``name_or_path``: ``"cifar10"``, ``"mnist"``, ``"fashion-mnist"``, or a folder of images, one
    sub-folder per class (with ``train/`` and ``test/`` or ``val/`` split folders, or split 80/20 per
    class with seed 0). ``image_size`` (int or (h, w)) resizes every image; a folder of images of
    mixed sizes needs it. ``download``: fetch a known data set from its official URL when missing.
    ``strict``: raise on unreadable image files instead of skipping them with a warning.
    ``limit``: keep a seeded (``seed``), stratified sample of that many images of the split (the rule of
    every ``--limit``, :func:`imclass.data.split.limit_indices`; a folder decodes only those files).
    A folder is decoded in the tier ``mode`` (``"memory"``, ``"cache"``: a memory-mapped cache file
    reused by later loads; None chooses from the headers and the memory available and says which on
    stderr when ``verbose``; ``reserve``: bytes kept for the model, ``imclass.data.source.model_reserve``;
    see ``imclass.data.source``). Named data sets are held in memory.

    >>> train = load("cifar10", split="train")            # doctest: +SKIP
    >>> train.images.shape, train.classes[:3]              # doctest: +SKIP
    (torch.Size([50000, 3, 32, 32]), ['airplane', 'automobile', 'bird'])
    """
    size = parse_image_size(image_size)
    name = canonical_name(name_or_path) if isinstance(name_or_path, str) else None  # a Path is always a folder
    if name is None:
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise TypeError(
                f"expected a data set name or a folder path, received {type(name_or_path).__name__} "
                f"(for arrays or tensors use imclass.data.from_arrays(images, labels))"
            )
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise ValueError(
                f"unknown data set {str(name_or_path)!r}: expected one of {', '.join(names())}, "
                f"or a path to a folder of images with one sub-folder per class (no folder {path} exists)"
            )
        if (path / "index.json").is_file():  # written by `imclass data shard`
            return _load_shards(path, split, size, mode=mode, limit=limit, verbose=verbose)
        return load_folder(path, split, size, strict=strict, limit=limit, limit_seed=seed, mode=mode,
                           cache_dir=cache_dir, verbose=verbose, reserve=reserve)
    if mode not in (None, "memory"):
        raise ValueError(f"{name} is held in memory (a named data set); --data-mode {mode} applies to image folders")
    ds = limit_dataset(_load_known(name, split, root, download), limit, seed=seed)
    h, w = ds.images.shape[-2:]
    if size is not None and (h, w) != size:
        ds.images = resize_images(ds.images, size)
        ds.notes.append(f"resized from {h}x{w} to {size[0]}x{size[1]}")
    return ds


def _load_shards(path: Path, split: str, size: tuple[int, int] | None, *, mode: str | None, limit: int | None,
                 verbose: bool) -> Any:
    """One split of a shard folder written by ``imclass data shard``: always the stream tier."""
    if mode not in (None, "stream"):
        raise ValueError(f"{path} holds WebDataset shards: they are read in the stream tier (--data-mode stream), "
                         f"received --data-mode {mode}")
    if limit is not None:
        raise ValueError(f"{path} holds WebDataset shards: --limit needs the image folder (shards are read whole)")
    splits = ShardSet(path).splits
    source = ShardSource(path, "val" if split == "test" and "test" not in splits and "val" in splits else split,
                         image_size=size)
    if verbose:
        print(f"data: {len(source):,} images of {'x'.join(map(str, source.image_shape))} in {len(source.shard_paths)} "
              f"{source.split} shard(s) of {path} -> stream tier: read shard by shard, nothing held", file=sys.stderr,
              flush=True)
    return source


def _load_known(name: str, split: str, root: Any, download: bool) -> ImageDataset:
    if split not in OFFICIAL_SIZES[name]:
        hint = " (for a validation part use imclass.data.train_val_split on the train split)" if split == "val" else ""
        raise ValueError(f"expected split 'train' or 'test' for {name}, received split={split!r}{hint}")
    folder = dl.resolve_root(root) / name
    files = _find_files(name, split, folder)
    if files is None:
        if not download:
            raise FileNotFoundError(_missing_message(name, folder))
        dl.fetch(name, folder.parent)
        files = _find_files(name, split, folder)
        if files is None:
            raise FileNotFoundError(_missing_message(name, folder))
    key = (name, split) + tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size) for f in files)
    if key not in _CACHE:
        _CACHE[key] = _read(name, split, files)
    images, labels, classes, source = _CACHE[key]
    ds = ImageDataset(images.clone(), labels.clone(), list(classes), name=name, split=split, source=source)
    official = OFFICIAL_SIZES[name][split]
    if len(ds) < official:
        note = f"{name} {split} split has {len(ds):,} of the official {official:,} images"
        ds.notes.append(note)
        if note not in _WARNED:
            _WARNED.add(note)
            warnings.warn(note, stacklevel=3)
    return ds


def _find_files(name: str, split: str, folder: Path) -> list[Path] | None:
    """The files holding ``split`` under ``folder``, or None when they are not all there."""
    if name == "cifar10":
        for batches, files in ((cifar.BATCHES_DIR, cifar.BATCH_FILES), (cifar.BINARY_DIR, cifar.BINARY_FILES)):
            needed = [folder / batches / f for f in files[split]]  # the official batches first, python then binary
            if all(f.is_file() for f in needed):
                return needed
        npz = folder / cifar.NPZ_FILE
        return [npz] if npz.is_file() else None
    found = []
    for kind in ("images-idx3", "labels-idx1"):
        stem = folder / f"{_IDX_PREFIX[split]}-{kind}-ubyte"
        candidates = [stem.with_name(stem.name + ".gz"), stem]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            return None
        found.append(hit)
    return found


def _missing_message(name: str, folder: Path) -> str:
    if name == "cifar10":
        want = (f"{folder / cifar.BATCHES_DIR}/ (the official python batches), {folder / cifar.BINARY_DIR}/ "
                f"(the official binary batches) or {folder / cifar.NPZ_FILE}")
    else:
        want = f"the four IDX files ({', '.join(r.filename for r in dl.RESOURCES[name])}) in {folder}"
    return (
        f"{name} not found: expected {want}. Pass download=True (or run `imclass data download {name}`), "
        f"put the files there, or set root= / --data / ${dl.ENV_VAR} to the folder that holds {name}/"
    )


def _read(name: str, split: str, files: list[Path]) -> tuple[torch.Tensor, torch.Tensor, list[str], str]:
    if name == "cifar10":
        if files[0].suffix == ".npz":
            images, labels = cifar.read_npz(files[0], split)
            return images, labels, list(cifar.CLASSES), str(files[0])
        if files[0].parent.name == cifar.BINARY_DIR:
            images, labels, classes = cifar.read_binary_batches(files[0].parent, split)
            return images, labels, classes, str(files[0].parent)
        images, labels, classes = cifar.read_batches(files[0].parent, split)
        return images, labels, classes, str(files[0].parent)
    x = read_idx(files[0], IMAGES_MAGIC)
    y = read_idx(files[1], LABELS_MAGIC)
    if len(x) != len(y):
        raise ValueError(f"{files[0]} holds {len(x)} images but {files[1]} holds {len(y)} labels; expected equal counts")
    if len(y) and int(y.max()) >= len(CLASSES[name]):
        raise ValueError(f"{files[1]}: expected labels in 0..{len(CLASSES[name]) - 1}, received max {int(y.max())}")
    images = torch.from_numpy(x).unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    return images, torch.from_numpy(y.astype("int64")), list(CLASSES[name]), str(files[0].parent)


def resize_images(images: torch.Tensor, size: int | tuple[int, int], *, chunk: int = 1024) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) images to ``size`` (bilinear, antialiased), a chunk at a time.

    Same pixels as ``torchvision.transforms.v2.functional.resize(antialias=True)``, which calls this
    uint8 kernel of torch, without importing torchvision (seconds).
    """
    h, w = parse_image_size(size)  # type: ignore[misc]
    out = torch.empty((len(images), images.shape[1], h, w), dtype=images.dtype)
    for i in range(0, len(images), chunk):
        out[i : i + chunk] = torch.nn.functional.interpolate(
            images[i : i + chunk], size=(h, w), mode="bilinear", antialias=True, align_corners=False
        )
    return out


def from_arrays(
    images: Any,
    labels: Any,
    classes: Sequence[str] | None = None,
    *,
    name: str = "arrays",
    split: str = "",
) -> ImageDataset:
    """Wrap in-memory images (numpy or torch; (N, H, W, C), (N, C, H, W) or (N, H, W)) and labels.

    Images must hold integers in 0..255 (converted to uint8); ``classes`` defaults to
    ``["0", "1", ...]`` up to the largest label.

    >>> import numpy as np
    >>> ds = from_arrays(np.zeros((4, 8, 8, 3), np.uint8), [0, 1, 1, 0], ["cat", "dog"])
    >>> ds.images.shape, ds.class_counts()
    (torch.Size([4, 3, 8, 8]), [2, 2])
    """
    x = as_images(images)
    if x.dtype != torch.uint8:
        if x.is_floating_point() or x.dtype == torch.bool or (len(x) and (int(x.min()) < 0 or int(x.max()) > 255)):
            lo_hi = f" in {x.min().item()}..{x.max().item()}" if len(x) and x.dtype != torch.bool else ""
            raise ValueError(
                f"expected uint8 images (integers 0..255), received {str(x.dtype).replace('torch.', '')}{lo_hi}; "
                f"scale float images in [0, 1] with (x * 255).round() and convert them to uint8"
            )
        x = x.to(torch.uint8)
    y = as_labels(labels, len(x))
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"expected labels >= 0, received {int(y.min())}")
    top = int(y.max()) + 1 if len(y) else 0
    classes = [str(c) for c in classes] if classes is not None else [str(i) for i in range(top)]
    if top > len(classes):
        raise ValueError(f"expected labels in 0..{len(classes) - 1} for {len(classes)} classes, received {top - 1}")
    return ImageDataset(x.contiguous(), y, classes, name=name, split=split)
