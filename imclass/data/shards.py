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
streaming); ``ShardSet(out)`` reads the index; ``ShardSource(out, split)`` is the stream tier over
the shards (timm's ``ReaderWds`` pattern: rank x worker shards of each epoch's seeded shard order).
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
from imclass.data.folder import SPLIT_SEED, TEST_FRACTION, parse_image_size
from imclass.data.inspect import folder_files
from imclass.data.loader import derive_seed
from imclass.data.split import split_indices
from imclass.data.stream import StreamLoader, StreamSource, default_workers, to_chw, worker_loader
from imclass.data.walk import relative_name

# Deferred imports (inside functions), for start-up time: tqdm.auto
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = ["FORMAT", "Sample", "ShardLoader", "ShardSet", "ShardSource", "parse_shard_size", "read_shard", "write_shards"]

FORMAT = "imclass-webdataset/1"
INDEX = "index.json"
DEFAULT_SHARD_BYTES = 256 << 20  # WebDataset's advice: shards of 100 MB to 1 GB
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff"}
_WINDOW = 64  # files decoded ahead of the writer (bounded memory, whatever the folder's size)
_SHUFFLE_BUFFER = 1000  # samples (encoded bytes) a shard reader shuffles among


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
        index["unreadable"] = [{"path": relative_name(p, root), "error": why} for p, why in sorted(bad)]
        index["seconds"] = time.perf_counter() - start
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
        os.replace(tmp, target)  # the whole set appears at once
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if bad:
        shown = "; ".join(f"{relative_name(p, root)} ({why})" for p, why in sorted(bad)[:10])
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


# ------------------------------------------------------------------------------ the stream tier over shards

def _shard_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The order the ``n`` shards are dealt out in ``epoch``: seeded by ``(seed, epoch)``, the same on every rank."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, epoch, 1)))


class _ShardStream(torch.utils.data.IterableDataset):
    """One rank's share of an epoch: worker ``w`` of ``workers`` reads every ``(world*workers)``-th shard of
    the epoch's seeded order from ``rank * workers + w`` on, and yields ``steps_w`` batches of ``batch``."""

    def __init__(self, shards: Sequence[Path], steps: int, batch: int, seed: int, epoch: int, rank: int, world: int,
                 workers: int, decode: Callable[[bytes, str], np.ndarray], channels: int, size: tuple[int, int],
                 shuffle: bool) -> None:
        self.shards, self.steps, self.batch, self.seed, self.epoch = list(shards), steps, batch, seed, epoch
        self.rank, self.world, self.workers = rank, world, max(1, workers)
        self.decode, self.channels, self.size, self.shuffle = decode, channels, size, shuffle

    def assigned(self, worker: int) -> list[int]:
        """Shard numbers worker ``worker`` of this rank reads this epoch (disjoint over ranks x workers)."""
        order = _shard_order(len(self.shards), self.seed, self.epoch, self.shuffle)
        g, total = self.rank * self.workers + worker, self.world * self.workers
        return order[g::total].tolist()

    def _samples(self, worker: int) -> Iterator[Any]:
        mine = self.assigned(worker)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        buffer: list[Any] = []
        cycle = 0
        while True:  # a worker whose shards run out before its steps are done reads them again
            for s in (rng.permutation(mine).tolist() if self.shuffle and cycle else mine):
                for sample in read_shard(self.shards[s]):
                    if not self.shuffle:
                        yield sample
                        continue
                    buffer.append(sample)
                    if len(buffer) >= _SHUFFLE_BUFFER:
                        k = int(rng.integers(len(buffer)))
                        buffer[k], buffer[-1] = buffer[-1], buffer[k]
                        yield buffer.pop()
            while buffer:
                k = int(rng.integers(len(buffer)))
                buffer[k], buffer[-1] = buffer[-1], buffer[k]
                yield buffer.pop()
            cycle += 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        worker = 0 if info is None else info.id
        count = len(range(worker, self.steps, self.workers))  # this worker's batches: w, w + workers, ...
        if count == 0:
            return
        samples = self._samples(worker)
        for _ in range(count):
            images = torch.empty((self.batch, self.channels, *self.size), dtype=torch.uint8)
            labels = torch.empty(self.batch, dtype=torch.long)
            keys = torch.empty(self.batch, dtype=torch.long)
            for k in range(self.batch):
                sample = next(samples)
                images[k] = to_chw(self.decode(sample.data, sample.key), self.channels)
                labels[k] = sample.label
                keys[k] = int(sample.key.rsplit("_", 1)[-1])
            yield keys, images, labels


class ShardLoader:
    """The loader of :class:`ShardSource`: ``len(self)`` steps per epoch on every rank, each rank's local batch
    ``batch_size // world_size`` (``indexed_batches`` yields sample positions, images, labels)."""

    def __init__(self, source: "ShardSource", batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1, drop_last: bool = True,
                 workers: int | None = None, sample_weights: torch.Tensor | None = None,
                 rows: torch.Tensor | None = None) -> None:
        if sample_weights is not None or rows is not None:
            raise ValueError("a shard reader reads whole shards: for rows or sample_weights use ShardSource.loader, "
                             "which reads those images by offset")
        if batch_size < world_size:
            raise ValueError(f"expected a global batch of at least one image per rank, received batch_size="
                             f"{batch_size} for {world_size} ranks")
        self.source, self.batch_size, self.shuffle, self.seed = source, int(batch_size), shuffle, int(seed)
        self.device = torch.device(device)
        self.rank, self.world_size = int(rank), int(world_size)
        self.local = self.batch_size // self.world_size
        self.workers = source.workers if workers is None else int(workers)
        per_rank = len(source) // self.world_size
        self.steps = per_rank // self.local if drop_last or per_rank % self.local == 0 else -(-per_rank // self.local)
        shards = len(source.shard_paths)
        if shards < self.world_size:
            raise ValueError(f"{source.folder} has {shards} {source.split} shard(s) for {self.world_size} rank(s): "
                             "every rank reads shards of its own; write smaller shards (imclass data shard --shard-size)")
        if workers is None and self.workers > shards // self.world_size:
            # each worker reads shards of its own: a small set written as one shard reads with one worker
            warnings.warn(f"{source.folder} has {shards} {source.split} shard(s) for {self.world_size} rank(s): "
                          f"reading them with {shards // self.world_size} worker(s) per rank, not {self.workers} "
                          "(smaller shards, imclass data shard --shard-size, read with more)", stacklevel=2)
            self.workers = shards // self.world_size
        if shards < self.world_size * max(1, self.workers):
            raise ValueError(f"{source.folder} has {shards} {source.split} shard(s) for {self.world_size} rank(s) x "
                             f"{max(1, self.workers)} worker(s): write smaller shards (imclass data shard --shard-size) "
                             "or use fewer workers")

    def __len__(self) -> int:
        return self.steps

    def global_batch_len(self, b: int) -> int:
        """Images in global batch ``b`` over all ranks (every rank's local batch is full)."""
        return self.local * self.world_size

    def stream(self, epoch: int) -> _ShardStream:
        """This rank's share of ``epoch`` (``assigned(worker)`` says which shards each worker reads)."""
        return _ShardStream(self.source.shard_paths, self.steps, self.local, self.seed, epoch, self.rank,
                            self.world_size, self.workers, self.source._decode, self.source.image_shape[0],
                            self.source.size, self.shuffle)

    def order(self, epoch: int) -> torch.Tensor:
        """The shard order of ``epoch`` (shard numbers; samples follow their shards)."""
        return _shard_order(len(self.source.shard_paths), self.seed, epoch, self.shuffle)

    def indexed_batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(sample positions, uint8 images, labels)`` of each step of ``epoch`` from ``start`` on (a resumed
        epoch reads the epoch's stream again and skips the first ``start`` steps)."""
        pin = self.device.type == "cuda"
        for b, (keys, images, labels) in enumerate(worker_loader(self.stream(epoch), self.workers, pin_memory=pin)):
            if b >= start:
                yield keys.to(self.device), images.to(self.device, non_blocking=pin), labels.to(self.device)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` of each step of ``epoch``."""
        for _, images, labels in self.indexed_batches(epoch, start):
            yield images, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(0)


class ShardSource(StreamSource):
    """One split of a shard folder written by ``imclass data shard`` (the ``"stream"`` tier over shards).

    ``image_size`` (h, w) is the size images are decoded to (default: the size the shards were written
    at). Labels, class counts and each sample's place in its tar come from the index, so ``read``
    (a seek per image), ``batches`` and the exact ``TensorLoader`` plan work as over files; ``loader``
    gives the rank x worker shard reader (:class:`ShardLoader`) unless ``rows`` or ``sample_weights``
    ask for particular images (then the exact plan, reading by offset).
    """

    def __init__(self, folder: str | os.PathLike, split: str = "train", *, image_size: int | tuple[int, int] | None = None,
                 channels: int = 3, workers: int | None = None, strict: bool = False) -> None:
        self.set = ShardSet(folder)
        self.folder, self.split = self.set.folder, split
        self.shard_paths = self.set.shards(split)
        self._table = self.set.table(split)
        if len(self._table) == 0:
            raise ValueError(f"{self.folder} holds no {split} images")
        self.labels = torch.from_numpy(np.ascontiguousarray(self._table[:, 0]))
        self.classes = self.set.classes
        size = parse_image_size(image_size) or (tuple(self.set.index["image_size"]) if self.set.index["image_size"] else None)
        if size is None:
            raise ValueError(f"{self.folder} was written without --image-size: give image_size to decode its images")
        if channels not in (1, 3):
            raise ValueError(f"expected channels 1 or 3, received channels={channels!r}")
        self.size, self._channels = tuple(size), channels
        self.workers = default_workers() if workers is None else int(workers)
        self.strict, self.verbose = strict, False
        self.name, self.source, self.notes, self.root = self.folder.name, str(self.folder), [], self.folder
        self._warned: set[int] = set()

    def _decode(self, data: bytes, key: str) -> np.ndarray:
        return decode_array(data, mode="L" if self._channels == 1 else "RGB", size=self.size, name=key)

    def _fetch(self, i: int) -> np.ndarray:
        return self._decode(self.set.read_bytes(self.split, [i], self._table)[0], self._name(i))

    def _name(self, i: int) -> str:
        return f"{self.folder}/{self.split}_{i:09d}"

    def _size(self) -> tuple[int, int]:
        return self.size

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return (self._channels, *self.size)

    def class_counts(self) -> list[int]:
        """Images per class (from the index)."""
        return list(self.set.index["splits"][self.split]["class_counts"])

    def loader(self, batch_size: int, **options: Any) -> ShardLoader | StreamLoader:
        """The rank x worker shard reader (``shuffle``, ``seed``, ``device``, ``rank``, ``world_size``,
        ``drop_last``, ``workers``; see :class:`ShardLoader`), or with ``rows`` / ``sample_weights`` the exact
        ``TensorLoader`` plan read by offset (:class:`StreamLoader`)."""
        if options.get("rows") is not None or options.get("sample_weights") is not None:
            return StreamLoader(self, batch_size, **options)
        options.pop("rows", None)
        options.pop("sample_weights", None)
        return ShardLoader(self, batch_size, **options)
