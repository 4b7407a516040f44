"""Where a data set's images live while a command runs: the three tiers, and the one chooser.

Every consumer gets its images as uint8 (N, C, H, W) batches plus int64 labels from an
``ImageSource`` (``read(indices)``, ``batches(batch_size)``, ``loader(...)``). Three tiers:

* ``"memory"``: one preallocated uint8 tensor, decoded straight into it (``ImageDataset``);
* ``"cache"``: the same tensor memory-mapped from a ``.npy`` file of the pre-resized images on
  disk (``ImageDataset`` whose ``images`` are file-backed pages: one decode pass, then reused by
  every later run and command while the files, the preprocessing and the size are unchanged);
* ``"stream"``: images decoded batch by batch by DataLoader worker processes, from the files or
  from WebDataset shards (``imclass.data.stream.StreamSource``).

``choose_mode`` picks one from the headers (image count x target size x channels) against the
memory this process actually has (``memory_budget``: cgroup v2 ``memory.max``, cgroup v1
``memory.limit_in_bytes``, ``RLIMIT_AS`` and the host's available memory), and says it in one line.
``--data-mode memory|cache|stream`` overrides it; nothing falls back silently.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import resource
import shutil
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from imclass.data.dataset import ImageDataset
from imclass.data.download import cache_dir as state_dir
from imclass.data.progress import Progress
from imclass.data.walk import take_paths

# Deferred imports (inside functions), for start-up time: torch.distributed
# optional or slow to import, loaded only where used (`import imclass`, `imclass --help` stay fast).

__all__ = [
    "CACHE_SUBDIR",
    "MODES",
    "Decoder",
    "ImageList",
    "ImageSource",
    "MemoryBudget",
    "TierChoice",
    "UnreadableImageError",
    "cache_folder",
    "choose_mode",
    "clear_image_cache",
    "find_cache",
    "inference_batch_size",
    "memory_budget",
    "model_reserve",
    "open_images",
]

MODES = ("memory", "cache", "stream")
CACHE_SUBDIR = "images"  # under $IMCLASS_CACHE (default ~/.cache/imclass)
MEMORY_SHARE = 0.5  # the in-memory tier when the stored images take at most this share of the memory available
DISK_MARGIN = 1.1  # the cache tier needs this times the stored bytes free on its disk
# What must fit beside the images (model_reserve): the model's parameters, their gradients and two optimizer
# moments (Adam: RESERVE_FACTOR x the parameter bytes), plus the activations of one batch (batches hold
# about 2 M pixels: inference_batch_size); a model not known yet counts as DEFAULT_MODEL_BYTES of parameters
# (16 M float32 parameters: more than MobileNetV2's 3.5 M or ResNet-20's 0.27 M, less than ResNet-50's 25 M).
RESERVE_FACTOR = 4
ACTIVATION_RESERVE = 256 << 20
DEFAULT_MODEL_BYTES = 64 << 20
_CACHE_VERSION = 1
_KEY_CHUNK = 4096  # files hashed per update: the key's text is never held for every file at once
_FLUSH_BYTES = 256 << 20  # write a building cache back to disk every so many bytes (bounded dirty pages)


class UnreadableImageError(ValueError):
    """Image files that could not be decoded (raised with ``strict=True``)."""


# --------------------------------------------------------------------------------------------
# how much memory this process has


@dataclass(frozen=True)
class MemoryBudget:
    """Bytes this process can still use, and which limit said so (the smallest one wins)."""

    bytes: int
    source: str  # e.g. "cgroup v2 memory.max", "cgroup v1 memory.limit_in_bytes", "RLIMIT_AS", "host MemAvailable"
    limits: dict[str, int] = field(default_factory=dict)  # every limit found: source -> bytes still available


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value < (1 << 60) else None  # "no limit" in cgroup v1 is a huge number


def _stat_value(path: Path, key: str) -> int | None:
    """The number after ``key`` on its line of a ``key value [kB]`` file (memory.stat, /proc/meminfo), else None."""
    try:
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == key:
                return int(parts[1]) * (1024 if parts[-1] == "kB" else 1)
    except (OSError, ValueError):
        return None
    return None


def _cgroup_limits(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> dict[str, int]:
    """Memory still available under each cgroup memory limit of this process (limit minus what the
    group holds in anonymous memory; page cache is reclaimable and not counted)."""
    found: dict[str, int] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        hier, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        rel = rel.lstrip("/")
        if hier == "0" and controllers == "":  # cgroup v2 (unified)
            for base in (root, root / "unified"):
                if not (base / "cgroup.controllers").is_file():
                    continue
                folder = base / rel
                while True:  # the tightest limit on the way up to the root counts
                    limit = _read_int(folder / "memory.max")
                    if limit is not None:
                        used = _stat_value(folder / "memory.stat", "anon") or 0
                        key = "cgroup v2 memory.max"
                        found[key] = min(found.get(key, limit - used), limit - used)
                    if folder == base:
                        break
                    folder = folder.parent
        elif "memory" in controllers.split(","):  # cgroup v1
            base = root / "memory"
            folder = base / rel
            while True:
                limit = _read_int(folder / "memory.limit_in_bytes")
                if limit is not None:
                    used = _stat_value(folder / "memory.stat", "total_rss") or _stat_value(folder / "memory.stat", "rss") or 0
                    key = "cgroup v1 memory.limit_in_bytes"
                    found[key] = min(found.get(key, limit - used), limit - used)
                if folder == base or not str(folder).startswith(str(base)):
                    break
                folder = folder.parent
    return found


def _proc_status(key: str) -> int | None:
    """A field of /proc/self/status in bytes (e.g. ``VmSize``)."""
    return _stat_value(Path("/proc/self/status"), f"{key}:")


def memory_budget() -> MemoryBudget:
    """The memory this process can still use: the smallest of every cgroup memory limit above it
    (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``, minus the group's anonymous memory),
    ``RLIMIT_AS`` (minus the address space already mapped) and the host's ``MemAvailable``."""
    limits = dict(_cgroup_limits())
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits["RLIMIT_AS"] = soft - (_proc_status("VmSize") or 0)
    available = _stat_value(Path("/proc/meminfo"), "MemAvailable:")
    if available is not None:
        limits["host MemAvailable"] = available
    elif hasattr(os, "sysconf"):
        try:
            limits["host free memory"] = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            pass
    if not limits:
        return MemoryBudget(1 << 62, "no limit found", {})
    source = min(limits, key=limits.get)
    return MemoryBudget(max(0, limits[source]), source, limits)


# --------------------------------------------------------------------------------------------
# the choice


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@dataclass(frozen=True)
class TierChoice:
    """The tier a command will read its images from, and why (``line()`` says it in one line)."""

    mode: str
    n_images: int
    image_shape: tuple[int, int, int]
    stored_bytes: int  # n_images x C x H x W
    budget: MemoryBudget
    reason: str  # "chosen" (from the headers) or "asked for (--data-mode)"
    reserve: int = 0  # bytes kept free beside the images for the model and its activations (model_reserve)

    @property
    def memory_bytes(self) -> int:
        """Bytes of anonymous memory the images themselves will take (the cache and stream tiers: none)."""
        return self.stored_bytes if self.mode == "memory" else 0

    def line(self) -> str:
        """``data: 30,000 images of 3x128x128 = 1.47 GB; 1.80 GB of memory available (cgroup v1 ...) -> cache tier ...``."""
        c, h, w = self.image_shape
        where = {
            "memory": f"{_gb(self.stored_bytes)} in memory",
            "cache": f"{_gb(self.stored_bytes)} memory-mapped from a cache file on disk, not in process memory",
            "stream": "decoded batch by batch, nothing held",
        }[self.mode]
        kept = f", {_gb(self.reserve)} of it kept for the model" if self.reserve else ""
        return (f"data: {self.n_images:,} images of {c}x{h}x{w} = {_gb(self.stored_bytes)}; "
                f"{_gb(self.budget.bytes)} of memory available ({self.budget.source}{kept}) -> {self.mode} tier "
                f"({self.reason}): {where}")


def model_reserve(model: torch.nn.Module | None = None, activations: int | None = None) -> int:
    """Bytes to keep free beside the images for ``model`` while it trains or predicts: ``RESERVE_FACTOR``
    x its parameter and buffer bytes (weights, gradients, two optimizer moments) + ``activations``, the
    bytes of one batch's activations (None: ``ACTIVATION_RESERVE``; the engine counts them for a model and a
    batch size: ``imclass.train.memory.activation_reserve``); ``model`` None (the model is built after the data
    is read): ``DEFAULT_MODEL_BYTES`` of parameters (512 MB in all)."""
    if model is None:
        weights = DEFAULT_MODEL_BYTES
    else:
        tensors = list(model.parameters()) + list(model.buffers())
        weights = sum(t.numel() * t.element_size() for t in tensors)
    return RESERVE_FACTOR * weights + (ACTIVATION_RESERVE if activations is None else int(activations))


def choose_mode(n_images: int, image_shape: Sequence[int], requested: str | None = None, *,
                cache_dir: str | os.PathLike | None = None, budget: MemoryBudget | None = None,
                reserve: int | None = None) -> TierChoice:
    """The tier for ``n_images`` images of ``image_shape`` (C, H, W) uint8.

    In memory when the stored bytes take at most ``MEMORY_SHARE`` of the memory left once ``reserve``
    bytes are kept for the model and its activations (``model_reserve``; None: ``model_reserve()``, a
    model not known yet); else the memory-mapped cache when its disk has room for it; else streaming.
    ``requested`` (``--data-mode``) overrides the choice.
    """
    if requested is not None and requested not in MODES:
        raise ValueError(f"expected --data-mode memory, cache or stream, received {requested!r}")
    c, h, w = (int(v) for v in image_shape)
    stored = int(n_images) * c * h * w
    budget = budget or memory_budget()
    reserve = model_reserve() if reserve is None else int(reserve)
    if requested is not None:
        return TierChoice(requested, int(n_images), (c, h, w), stored, budget, "asked for (--data-mode)", reserve)
    if stored <= MEMORY_SHARE * (budget.bytes - reserve):
        mode = "memory"
    elif _disk_free(cache_folder(cache_dir)) >= DISK_MARGIN * stored:
        mode = "cache"
    else:
        mode = "stream"
    return TierChoice(mode, int(n_images), (c, h, w), stored, budget, "chosen from the headers", reserve)


def _disk_free(folder: Path) -> int:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return 0


# --------------------------------------------------------------------------------------------
# what is read, and how


@dataclass
class ImageList:
    """A data set before decoding: the image files, their labels, the class names, where they came from."""

    paths: Sequence[Path]  # a folder walk's PathTable (each Path made when read) or a list
    labels: list[int]
    classes: list[str]
    root: Path
    name: str = ""
    split: str = ""
    notes: list[str] = field(default_factory=list)
    # (os.fspath(path), st_size, st_mtime_ns) per path from the folder walk's one stat of each file
    # (imclass.data.walk), so that the cache key stats nothing again; None: cache_key stats the files itself
    stats: list[tuple[str, int, int]] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: Sequence[int]) -> "ImageList":
        """The files at ``indices`` (in that order), e.g. a seeded ``--limit`` sample before anything is decoded."""
        idx = [int(i) for i in indices]
        stats = [self.stats[i] for i in idx] if self.stats is not None else None
        return ImageList(take_paths(self.paths, idx), [self.labels[i] for i in idx], list(self.classes), self.root,
                         self.name, self.split, list(self.notes), stats)


@dataclass(frozen=True)
class Decoder:
    """How one file becomes pixels: ``fn(path) -> uint8 (H, W) or (H, W, C) numpy array`` of ``size``.

    ``channels``: 1 or 3, or None (one grey channel when every image is grey, else RGB with grey
    images repeated). ``key`` names everything the pixels depend on besides the file (resizing,
    cropping, interpolation): it is part of the cache key.
    """

    fn: Callable[[Path], np.ndarray]
    size: tuple[int, int]
    key: str
    channels: int | None = None
    grey_probe: Callable[[Path], bool] | None = None  # from the header: is this file grey? (channels=None)


@runtime_checkable
class ImageSource(Protocol):
    """What every consumer reads images through (``ImageDataset`` for the memory and cache tiers,
    ``imclass.data.stream.StreamSource`` for the stream tier)."""

    mode: str
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int: ...

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    def read(self, indices: torch.Tensor) -> torch.Tensor: ...

    def batches(self, batch_size: int, indices: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def loader(self, batch_size: int, **options: Any) -> Any: ...


def inference_batch_size(image_shape: Sequence[int]) -> int:
    """Images per evaluation / prediction / feature batch for inputs of ``image_shape`` (C, H, W):
    about 2 M pixels per batch (512 at 32 and 64 px, 128 at 128 px, 41 at 224 px), at least 8, so
    that a forward pass's activations stay bounded whatever the input size (a fixed 512 at 224 px
    took 8 GB)."""
    h, w = int(image_shape[-2]), int(image_shape[-1])
    return max(8, min(512, (1 << 21) // max(1, h * w)))


# --------------------------------------------------------------------------------------------
# the cache


def cache_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where image caches live: ``cache_dir``, else ``$IMCLASS_CACHE/images`` (default ``~/.cache/imclass/images``)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return state_dir() / CACHE_SUBDIR


def cache_key(images: ImageList, decoder: Decoder) -> str:
    """A digest of everything the cached pixels depend on: every file's path, size and modification
    time, the labels, the decoder's key and size and channels, and the cache format.

    Sizes and times come from ``images.stats`` (the folder walk's one stat per file) when present,
    else from one ``os.stat`` per file here: either way one stat per file, no file opened."""
    h = hashlib.sha256()
    head = {"v": _CACHE_VERSION, "decoder": decoder.key, "size": list(decoder.size), "channels": decoder.channels,
            "classes": images.classes}
    h.update(json.dumps(head, sort_keys=True).encode())
    stats = images.stats
    if stats is None or len(stats) != len(images.paths):
        stats = [(os.fspath(p), st.st_size, st.st_mtime_ns) for p, st in zip(images.paths, map(os.stat, images.paths))]
    labels = images.labels
    for start in range(0, len(stats), _KEY_CHUNK):  # the same bytes as one update per file, a chunk at a time
        h.update("".join(f"{text}\0{size}\0{mtime}\0{label}\n" for (text, size, mtime), label
                         in zip(stats[start:start + _KEY_CHUNK], labels[start:start + _KEY_CHUNK])).encode())
    return h.hexdigest()[:32]


def find_cache(images: ImageList, decoder: Decoder, cache_dir: str | os.PathLike | None = None, *,
               key: str | None = None) -> Path | None:
    """The manifest of a complete cache of ``images`` decoded by ``decoder``, or None (``key``: their
    ``cache_key`` when already computed)."""
    manifest = cache_folder(cache_dir) / f"{key or cache_key(images, decoder)}.json"
    return manifest if manifest.is_file() else None


def clear_image_cache(cache_dir: str | os.PathLike | None = None) -> int:
    """Delete every image cache (and leftovers of killed builds) under the cache folder; returns bytes freed."""
    folder = cache_folder(cache_dir)
    freed = 0
    if folder.is_dir():
        for f in folder.iterdir():
            if f.is_file() and (f.suffix in (".npy", ".json") or ".tmp" in f.name):
                freed += f.stat().st_size
                f.unlink()
    return freed


def _dead_leftovers(folder: Path) -> None:
    """Remove temporary files of builds whose process is gone (a killed build)."""
    for f in folder.glob(".*.tmp-*"):
        try:
            pid = int(f.name.rsplit("-", 1)[1].split(".")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            f.unlink(missing_ok=True)
        except (ValueError, IndexError, PermissionError, OSError):
            continue


def _open_cache(manifest: Path, images: ImageList) -> ImageDataset:
    meta = json.loads(manifest.read_text())
    array = np.load(manifest.with_suffix(".npy"), mmap_mode="c")  # copy-on-write: reads share the page cache
    n = int(meta["n"])
    labels = torch.from_numpy(np.load(manifest.with_name(manifest.stem + ".labels.npy")).astype(np.int64))
    if len(labels) != n or array.shape[0] < n:
        raise ValueError(f"image cache {manifest} is inconsistent ({len(labels)} labels, {array.shape[0]} rows, n={n}); "
                         f"clear it with `imclass data cache --clear`")
    tensor = torch.from_numpy(array)[:n]
    notes = list(images.notes) + list(meta.get("notes", []))
    return ImageDataset(tensor, labels, list(images.classes), name=images.name, split=images.split, notes=notes,
                        source=str(images.root), mode="cache")


# --------------------------------------------------------------------------------------------
# decoding


def _channels(images: ImageList, decoder: Decoder) -> int:
    """1 when every file is grey (from the headers), else 3 (decoder.channels wins)."""
    if decoder.channels is not None:
        return decoder.channels
    if decoder.grey_probe is None:
        return 3
    for p in images.paths:
        try:
            if not decoder.grey_probe(p):
                return 3
        except Exception:
            continue  # unreadable: reported by the decode pass
    return 1


def _decode_into(out: Any, images: ImageList, decoder: Decoder, positions: Sequence[int], *, workers: int | None,
                 progress: Progress | None, flush: Callable[[], None] | None = None) -> list[tuple[int, str]]:
    """Decode ``images.paths[i]`` for ``i`` in ``positions`` into row ``i`` of ``out`` (uint8 (N, C, H, W),
    a tensor or a numpy memmap); returns the (index, reason) of every file that could not be read."""
    c = out.shape[1]
    h, w = decoder.size
    bad: list[tuple[int, str]] = []

    def one(i: int) -> tuple[int, np.ndarray | str]:
        try:
            a = decoder.fn(images.paths[i])
        except Exception as err:  # a worker never raises: every bad file is reported at once
            return i, getattr(err, "reason", None) or f"{type(err).__name__}: {err}"
        if a.shape[:2] != (h, w):
            return i, f"decoded to {a.shape[0]}x{a.shape[1]}, expected {h}x{w}"
        return i, a

    workers = workers or min(8, os.cpu_count() or 1)
    written = 0
    row_bytes = c * h * w
    as_numpy = isinstance(out, np.ndarray)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, a in pool.map(one, positions):
            if progress is not None:
                progress.update()
            if isinstance(a, str):
                bad.append((i, a))
                continue
            if a.ndim == 2:
                a = a[None]  # (H, W) -> (1, H, W), repeated to 3 channels below when needed
            else:
                a = a.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
            if a.shape[0] != c:
                if a.shape[0] == 1:
                    a = np.broadcast_to(a, (c, h, w))
                else:
                    raise _NotGrey()
            if as_numpy:
                out[i] = a
            else:
                out[i] = torch.from_numpy(np.ascontiguousarray(a))
            written += row_bytes
            if flush is not None and written >= _FLUSH_BYTES:
                flush()
                written = 0
    return bad


class _NotGrey(Exception):
    """A colour image in a set the headers said was grey: decode again with 3 channels."""


def _report_bad(bad: list[tuple[int, str]], images: ImageList, strict: bool) -> None:
    if not bad:
        return
    def rel(path: Path) -> str:
        try:
            return str(path.relative_to(images.root))
        except ValueError:
            return str(path)

    bad = sorted(bad)
    shown = "; ".join(f"{rel(images.paths[i])} ({why})" for i, why in bad[:10])
    more = f"; and {len(bad) - 10} more" if len(bad) > 10 else ""
    message = f"{len(bad)} unreadable image file(s) in {images.root}: {shown}{more}"
    if strict:
        raise UnreadableImageError(message)
    warnings.warn(f"skipped {message} (pass strict=True to make this an error)", stacklevel=4)


def _compact(out: Any, bad: list[tuple[int, str]]) -> list[int]:
    """Move the rows of the readable files to the front of ``out`` (in place); returns their indices."""
    dropped = {i for i, _ in bad}
    kept = [i for i in range(len(out)) if i not in dropped]
    for new, old in enumerate(kept):
        if new != old:
            out[new] = out[old]
    return kept


def _decode_memory(images: ImageList, decoder: Decoder, *, strict: bool, workers: int | None,
                   verbose: bool) -> ImageDataset:
    """The in-memory tier: one preallocated uint8 tensor, each file decoded straight into its row."""
    n = len(images)
    h, w = decoder.size
    c = _channels(images, decoder)
    while True:
        out = torch.empty((n, c, h, w), dtype=torch.uint8)
        progress = Progress(n, "decoding", verbose=verbose)
        try:
            bad = _decode_into(out, images, decoder, range(n), workers=workers, progress=progress)
        except _NotGrey:
            progress.close()
            del out
            c = 3
            continue
        progress.close()
        break
    _report_bad(bad, images, strict)
    if len(bad) == n:
        raise ValueError(f"none of the {n} image files in {images.root} could be read")
    kept = _compact(out, bad)
    out = out[: len(kept)]  # a view: no copy
    labels = torch.tensor([images.labels[i] for i in kept], dtype=torch.long)
    return ImageDataset(out, labels, list(images.classes), name=images.name, split=images.split,
                        notes=list(images.notes), source=str(images.root), mode="memory",
                        paths=[_relative(images.paths[i], images.root) for i in kept])


def _relative(path: Any, root: Any) -> str:
    """``path`` relative to ``root`` when it lies below it (what reports and CSV files show), else as given."""
    p, r = Path(path), Path(root)
    return str(p.relative_to(r)) if p.is_relative_to(r) else str(p)


def _dist() -> tuple[int, int]:
    """(rank, world size) of an initialised torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def build_cache(images: ImageList, decoder: Decoder, cache_dir: str | os.PathLike | None = None, *,
                strict: bool = False, workers: int | None = None, verbose: bool = True, key: str | None = None) -> Path:
    """Decode ``images`` once into a memory-mapped ``.npy`` cache (unless a complete one exists) and
    return its manifest. Written atomically: a temporary file renamed into place, the manifest last,
    so a killed build never leaves a readable half cache. Under torch.distributed the ranks decode
    disjoint files (rank r takes files r, r + k, ...) into the one shared file."""
    folder = cache_folder(cache_dir)
    key = key or cache_key(images, decoder)
    manifest = folder / f"{key}.json"
    rank, world = _dist()
    if manifest.is_file():
        return manifest
    folder.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _dead_leftovers(folder)
    n = len(images)
    h, w = decoder.size
    c = _channels(images, decoder)
    # one temporary name for all ranks: rank 0's pid, shared through the group
    tag = _broadcast(f"{os.getpid()}")
    while True:
        tmp = folder / f".{key}.tmp-{tag}.npy"
        if rank == 0:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, c, h, w)).flush()
        _barrier()
        out = np.lib.format.open_memmap(tmp, mode="r+")
        progress = Progress(len(range(rank, n, world)), f"building the image cache {folder / key}.npy",
                            verbose=verbose and rank == 0)
        try:
            bad = _decode_into(out, images, decoder, range(rank, n, world), workers=workers, progress=progress,
                               flush=out.flush)
            grey_ok = True
        except _NotGrey:
            grey_ok, bad = False, []
        progress.close()
        out.flush()
        if not _all_true(grey_ok):
            del out
            _barrier()
            if rank == 0:
                tmp.unlink(missing_ok=True)
            c = 3
            continue
        break
    bad = _gather_lists(bad)
    _barrier()
    if rank == 0:
        try:
            _report_bad(bad, images, strict)
        except BaseException:
            del out
            tmp.unlink(missing_ok=True)
            raise
        if len(bad) == n:
            tmp.unlink(missing_ok=True)
            raise ValueError(f"none of the {n} image files in {images.root} could be read")
        kept = _compact(out, bad) if bad else list(range(n))
        out.flush()
        del out
        labels = np.asarray([images.labels[i] for i in kept], dtype=np.int64)
        tmp_labels = folder / f".{key}.labels.tmp-{tag}.npy"
        np.save(tmp_labels, labels)
        info = {"n": len(kept), "shape": [len(kept), c, h, w], "decoder": decoder.key, "root": str(images.root),
                "files": n, "unreadable": [os.fspath(images.paths[i]) for i, _ in sorted(bad)],
                "created": time.strftime("%Y-%m-%d %H:%M:%S"), "version": _CACHE_VERSION}
        tmp_manifest = folder / f".{key}.tmp-{tag}.json"
        tmp_manifest.write_text(json.dumps(info, indent=1) + "\n")
        os.replace(tmp, folder / f"{key}.npy")
        os.replace(tmp_labels, folder / f"{key}.labels.npy")
        os.replace(tmp_manifest, manifest)  # last: a cache is readable only once all of it is in place
    else:
        del out
    _barrier()
    if not manifest.is_file():
        raise RuntimeError(f"the image cache {manifest} was not written (is {folder} shared by all ranks?)")
    return manifest


def _broadcast(value: str) -> str:
    import torch.distributed as dist

    rank, world = _dist()
    if world == 1:
        return value
    box = [value if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_true(flag: bool) -> bool:
    import torch.distributed as dist

    if _dist()[1] == 1:
        return flag
    t = torch.tensor([0 if flag else 1])
    dist.all_reduce(t)
    return int(t) == 0


def _gather_lists(items: list) -> list:
    import torch.distributed as dist

    rank, world = _dist()
    if world == 1:
        return items
    gathered: list = [None] * world
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def open_images(images: ImageList, decoder: Decoder, mode: str | None = None, *,
                cache_dir: str | os.PathLike | None = None, strict: bool = False, workers: int | None = None,
                verbose: bool = True, say: Callable[[str], None] | None = None, reserve: int | None = None) -> Any:
    """``images`` decoded by ``decoder`` in the tier ``mode`` (None: ``choose_mode`` decides, keeping
    ``reserve`` bytes for the model: ``model_reserve``).

    Returns an ``ImageDataset`` (``mode`` ``"memory"`` or ``"cache"``) or a stream source
    (``imclass.data.stream.StreamSource``); its ``mode`` says which. The choice is said in one line
    through ``say`` (default: stderr when ``verbose``). An existing complete cache is always used.
    """
    if len(images) == 0:
        raise ValueError(f"no image files in {images.root}")
    key = cache_key(images, decoder) if mode in (None, "cache") else None  # one stat per file, once
    if mode is None and find_cache(images, decoder, cache_dir, key=key) is not None:
        mode, reason = "cache", "an existing cache"
    else:
        reason = None
    c = decoder.channels or 3
    choice = choose_mode(len(images), (c, *decoder.size), mode, cache_dir=cache_dir, reserve=reserve)
    if reason is not None:
        choice = dataclasses.replace(choice, reason=reason)
    say = say or ((lambda line: print(line, file=sys.stderr, flush=True)) if verbose and _dist()[0] == 0 else None)
    if say is not None:
        say(choice.line())
    if choice.mode == "memory":
        return _decode_memory(images, decoder, strict=strict, workers=workers, verbose=verbose)
    if choice.mode == "cache":
        manifest = build_cache(images, decoder, cache_dir, strict=strict, workers=workers, verbose=verbose, key=key)
        return _open_cache(manifest, images)
    try:
        from imclass.data.stream import StreamSource
    except ImportError:
        raise ValueError("the stream tier is not available in this version of imclass: use --data-mode memory or cache") from None
    return StreamSource(images, decoder, strict=strict, workers=workers, verbose=verbose)
