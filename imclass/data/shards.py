"""WebDataset-format tar shards of an image folder: written once, streamed by many machines.

``write_shards(folder, out)`` reads a class-per-folder tree (the layouts of ``imclass.data.load``:
a split tree's folders, or a plain tree split 80/20 per class with seed 0 as ``load`` does) and
writes, per split, tar files ``<split>-000000.tar``, ... of samples in a seeded shuffled order:

    <key>.jpg (or .png, .webp, ...)   the image: the file's own bytes, or re-encoded at --image-size
    <key>.cls                         the class index as decimal text

plus ``index.json`` (format, classes, per split: the shards with their sample counts and class
counts, the total) and ``<split>-samples.npy`` (per sample in shard order: label, shard, byte offset
and byte count of the image in its tar: any sample can be read without scanning). Keys are
``<split>_<position>`` (no dots: WebDataset splits a member name at its first dot). This is the
layout the ``webdataset`` library and timm's ``ReaderWds`` read.

Atomic: everything is written into a hidden sibling folder, renamed to ``out`` only when complete,
so a killed run leaves no half-written set that looks finished.

``read_shard(path)`` yields ``Sample(key, data, ext, label)`` from one tar (stdlib ``tarfile``,
streaming); ``ShardSet(out)`` reads the index.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from imclass.data.decode import ImageError, decode_array, probe_image
from imclass.data.folder import SPLIT_SEED, TEST_FRACTION, _rel, parse_image_size
from imclass.data.inspect import folder_files
from imclass.data.split import split_indices

__all__ = ["FORMAT", "Sample", "ShardSet", "parse_shard_size", "read_shard", "write_shards"]

FORMAT = "imclass-webdataset/1"
INDEX = "index.json"
DEFAULT_SHARD_BYTES = 256 << 20  # WebDataset's advice: shards of 100 MB to 1 GB
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}
_WINDOW = 64  # files decoded ahead of the writer (bounded memory, whatever the folder's size)


@dataclass(frozen=True)
class Sample:
    """One sample of a shard: its key, the image bytes and their extension, the class index."""

    key: str
    data: bytes
    ext: str
    label: int


def parse_shard_size(text: str | int) -> tuple[int, int]:
    """``"1000"`` -> (1000 images, 0); ``"256MB"``/``"1GB"`` -> (0, bytes). A shard closes at either limit."""
    if isinstance(text, int):
        value, unit = text, ""
    else:
        found = re.fullmatch(r"\s*(\d+)\s*([kKmMgG][bB]?)?\s*", str(text))
        if not found:
            raise ValueError(f"expected --shard-size as a number of images (1000) or bytes (256MB, 1GB), "
                             f"received {text!r}")
        value, unit = int(found.group(1)), (found.group(2) or "").lower()
    if value < 1:
        raise ValueError(f"expected a positive --shard-size, received {text!r}")
    if not unit:
        return value, 0
    return 0, value << {"k": 10, "m": 20, "g": 30}[unit[0]]


def _encode(path: Path, size: tuple[int, int] | None, quality: int) -> tuple[bytes, str]:
    """The bytes stored for one file: its own (checked through the decoding gate), or re-encoded at ``size``."""
    raw = Path(path).read_bytes()
    info = probe_image(raw, name=str(path))
    if size is None:
        decode_array(raw, name=str(path))  # a truncated or hostile file fails here, not in every reader later
        return raw, _EXT.get(info.format, "jpg")
    from PIL import Image

    pixels = decode_array(raw, size=size, name=str(path))
    buf = io.BytesIO()
    if info.format == "PNG":  # lossless sources stay lossless
        Image.fromarray(pixels).save(buf, format="PNG")
        return buf.getvalue(), "png"
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), "jpg"


def _ordered(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> Iterator[Any]:
    """``map(fn, items)`` on a thread pool, in order, at most ``_WINDOW`` results ahead (bounded memory)."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= _WINDOW:
                yield pending.pop(0).result()
        while pending:
            yield pending.pop(0).result()


def _add(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> int:
    """Append one member; returns where its bytes start in the tar file (after its one 512-byte header)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime), 0o644
    info.uname = info.gname = ""
    start = tar.offset
    tar.addfile(info, io.BytesIO(data))
    return start + tarfile.BLOCKSIZE  # USTAR names under 100 characters: a single header block


def write_shards(folder: str | os.PathLike, out: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
                 shard_size: str | int = "256MB", quality: int = 90, seed: int = 0, workers: int | None = None,
                 verbose: bool = True) -> dict[str, Any]:
    """Write the images of ``folder`` as WebDataset tar shards into ``out`` (see the module docstring).

    ``image_size`` re-encodes every image at that size (JPEG ``quality``, PNG sources stay PNG);
    without it each file's bytes are stored as they are. ``shard_size``: images (``"1000"``) or
    bytes (``"256MB"``) per shard. The samples of each split are shuffled with ``seed`` so every
    shard holds a mix of classes. Unreadable files are left out and named in one warning. Returns
    the index (also written to ``out/index.json``). Raises when ``out`` exists already.
    """
    from tqdm.auto import tqdm

    root = Path(folder).expanduser()
    target = Path(out).expanduser()
    if target.exists():
        raise FileExistsError(f"{target} exists already: choose a new --out folder (or remove it)")
    size = parse_image_size(image_size)
    max_images, max_bytes = parse_shard_size(shard_size)
    if not 1 <= quality <= 100:
        raise ValueError(f"expected 1 <= quality <= 100, received quality={quality}")
    start = time.perf_counter()
    layout, _, classes, records = folder_files(root)
    by_split: dict[str, list[tuple[Path, int]]] = {}
    if layout == "plain":  # the split imclass.data.load makes of a plain tree
        labels = torch.tensor([r["label"] for r in records])
        train_idx, test_idx = split_indices(labels, TEST_FRACTION, seed=SPLIT_SEED)
        for name, idx in (("train", train_idx), ("test", test_idx)):
            by_split[name] = [(records[i]["path"], records[i]["label"]) for i in idx.tolist()]
    else:
        for r in records:
            by_split.setdefault(r["split"], []).append((r["path"], r["label"]))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    index: dict[str, Any] = {"format": FORMAT, "classes": list(classes), "source": str(root), "layout": layout,
                             "image_size": list(size) if size else None, "seed": seed, "splits": {}}
    bad: list[tuple[Path, str]] = []
    workers = workers or min(8, os.cpu_count() or 1)
    try:
        for split, files in by_split.items():
            order = np.random.default_rng([seed, len(files)]).permutation(len(files))
            files = [files[i] for i in order]

            def encode(item: tuple[Path, int]) -> tuple[Path, int, bytes | None, str]:
                try:
                    data, ext = _encode(item[0], size, quality)
                    return item[0], item[1], data, ext
                except ImageError as err:
                    return item[0], item[1], None, err.reason
                except OSError as err:
                    return item[0], item[1], None, f"cannot read the file ({err.strerror or type(err).__name__})"

            shards: list[dict[str, Any]] = []
            labels_out: list[int] = []
            where: list[tuple[int, int, int]] = []  # (shard, offset, bytes) of each sample: random access
            tar = None
            now = time.time()
            bar = tqdm(total=len(files), desc=f"shards {split}", disable=None if verbose else True, leave=False)
            for path, label, data, ext in _ordered(encode, files, workers):
                bar.update()
                if data is None:
                    bad.append((path, ext))
                    continue
                full = shards and ((max_images and shards[-1]["count"] >= max_images)
                                   or (max_bytes and shards[-1]["bytes"] + len(data) > max_bytes and shards[-1]["count"]))
                if tar is None or full:
                    if tar is not None:
                        tar.close()
                    name = f"{split}-{len(shards):06d}.tar"
                    tar = tarfile.open(tmp / name, "w", format=tarfile.USTAR_FORMAT)
                    shards.append({"name": name, "count": 0, "bytes": 0, "class_counts": [0] * len(classes)})
                key = f"{split}_{len(labels_out):09d}"
                where.append((len(shards) - 1, _add(tar, f"{key}.{ext}", data, now), len(data)))
                _add(tar, f"{key}.cls", str(label).encode(), now)
                shard = shards[-1]
                shard["count"] += 1
                shard["bytes"] += len(data)
                shard["class_counts"][label] += 1
                labels_out.append(label)
            bar.close()
            if tar is not None:
                tar.close()
            table = np.array([(y, *w) for y, w in zip(labels_out, where)], dtype=np.int64).reshape(-1, 4)
            np.save(tmp / f"{split}-samples.npy", table)  # (N, 4): label, shard, byte offset, byte count
            index["splits"][split] = {
                "count": len(labels_out),
                "class_counts": np.bincount(np.array(labels_out, dtype=np.int64), minlength=len(classes)).tolist(),
                "shards": [{k: v for k, v in s.items() if k != "bytes"} | {"bytes": (tmp / s["name"]).stat().st_size}
                           for s in shards],
            }
            if verbose:
                print(f"shards {split}: {len(labels_out):,} images in {len(shards)} shard(s)", flush=True)
        index["unreadable"] = [{"path": _rel(p, root), "error": why} for p, why in sorted(bad)]
        index["seconds"] = time.perf_counter() - start
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
        os.replace(tmp, target)  # the whole set appears at once
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if bad:
        shown = "; ".join(f"{_rel(p, root)} ({why})" for p, why in sorted(bad)[:10])
        more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
        warnings.warn(f"left out {len(bad)} unreadable image file(s) of {root}: {shown}{more}", stacklevel=2)
    return index


def read_shard(path: str | os.PathLike) -> Iterator[Sample]:
    """The samples of one tar shard, in order (streamed: one sample in memory at a time)."""
    key, data, ext, label = None, None, "", None
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            k, _, suffix = base.partition(".")
            if k != key:
                if key is not None and data is not None and label is not None:
                    yield Sample(key, data, ext, label)
                key, data, ext, label = k, None, "", None
            payload = tar.extractfile(member).read()
            if suffix == "cls":
                label = int(payload.decode().strip())
            elif suffix in _EXT.values() or suffix == "jpeg":
                data, ext = payload, suffix
        if key is not None and data is not None and label is not None:
            yield Sample(key, data, ext, label)


class ShardSet:
    """A folder written by :func:`write_shards`: ``classes``, ``splits``, and per split the shard paths,
    sample counts and labels."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder).expanduser()
        index = self.folder / INDEX
        if not index.is_file():
            raise FileNotFoundError(f"{self.folder} holds no {INDEX}: not a shard folder written by "
                                    "`imclass data shard` (or its writing did not finish)")
        self.index = json.loads(index.read_text())
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index}: format {self.index.get('format')!r}, expected {FORMAT!r}")
        self.classes: list[str] = list(self.index["classes"])
        self.splits: list[str] = list(self.index["splits"])

    def _split(self, split: str) -> dict[str, Any]:
        if split not in self.index["splits"]:
            raise ValueError(f"{self.folder} has splits {', '.join(self.splits)}, received split={split!r}")
        return self.index["splits"][split]

    def shards(self, split: str) -> list[Path]:
        """The tar files of ``split``, in the order they were written."""
        return [self.folder / s["name"] for s in self._split(split)["shards"]]

    def counts(self, split: str) -> list[int]:
        """Samples per shard of ``split``."""
        return [int(s["count"]) for s in self._split(split)["shards"]]

    def table(self, split: str) -> np.ndarray:
        """(N, 4) int64 per sample of ``split`` in shard order: label, shard number, byte offset, byte count."""
        self._split(split)
        return np.load(self.folder / f"{split}-samples.npy")

    def labels(self, split: str) -> torch.Tensor:
        """The label of every sample of ``split`` in shard order, int64 (N,)."""
        return torch.from_numpy(np.ascontiguousarray(self.table(split)[:, 0]))

    def read_bytes(self, split: str, positions: Sequence[int], table: np.ndarray | None = None) -> list[bytes]:
        """The image bytes of the samples at ``positions`` of ``split`` (seek and read; no scan)."""
        table = self.table(split) if table is None else table
        paths = self.shards(split)
        out = []
        for i in positions:
            _, shard, offset, size = (int(v) for v in table[int(i)])
            with open(paths[shard], "rb") as f:
                f.seek(offset)
                out.append(f.read(size))
        return out

    def samples(self, split: str) -> Iterable[Sample]:
        """Every sample of ``split``, shard after shard."""
        for path in self.shards(split):
            yield from read_shard(path)
