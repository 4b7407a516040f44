"""The stream tier: images decoded batch by batch by DataLoader worker processes, nothing held.

Two sources, one contract (``imclass.data.source.ImageSource``: ``mode``, ``labels``, ``classes``,
``image_shape``, ``read``, ``batches``, ``loader``):

* :class:`StreamSource` over image files (an ``ImageList`` and a ``Decoder`` of the tier
  interface). Its loader draws exactly the batches of the in-memory ``TensorLoader`` (the same
  seeded permutation of ``(seed, epoch)``, each rank's contiguous slice of every global batch),
  and worker processes decode them: the same batches as the memory and cache tiers, so training
  on a folder gives the same figures in every tier, and under DDP the ranks read disjoint files.
* :class:`ShardSource` over WebDataset tar shards written by ``imclass data shard``
  (``imclass.data.shards``). timm's ``ReaderWds`` pattern: each epoch draws a seeded order of
  the shards; global worker ``rank * workers + worker`` takes every ``(world * workers)``-th
  shard of it, shuffles samples in a buffer, and decodes. Every rank runs the same number of
  steps (``samples // world // local batch``; a worker whose shards run out starts them again).
  Bit-exactness against one process is given up: the batches depend on the number of ranks
  and workers.

Memory: ``workers * prefetch`` batches of uint8 pixels in flight (plus a shuffle buffer of
encoded bytes for shards), whatever the number of images.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from imclass.data.loader import TensorLoader, derive_seed

__all__ = ["ShardSource", "StreamLoader", "StreamSource", "default_workers"]

_PREFETCH = 2  # batches each worker decodes ahead
_SHUFFLE_BUFFER = 1000  # samples (encoded bytes) a shard reader shuffles among


def default_workers() -> int:
    """DataLoader worker processes when none are asked for: the CPU cores this process may use, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


def _to_chw(a: np.ndarray, channels: int) -> torch.Tensor:
    """(H, W) or (H, W, C) uint8 -> (channels, H, W), a grey image repeated for a colour set."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)  # (H, W, C) -> (C, H, W)
    if t.shape[0] != channels:
        if t.shape[0] != 1:
            raise ValueError(f"a colour image in a set read with {channels} channel(s)")
        t = t.expand(channels, -1, -1)
    return t


class _Batches(torch.utils.data.Dataset):
    """Item ``b`` = the decoded images of ``plan[b]`` (sample positions; ``fetch(i)`` decodes sample ``i``):
    what one worker makes at a time."""

    def __init__(self, fetch: Callable[[int], np.ndarray], size: tuple[int, int], channels: int,
                 plan: Sequence[torch.Tensor]) -> None:
        self.fetch, self.size, self.channels, self.plan = fetch, size, channels, plan

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, b: int) -> tuple[torch.Tensor, list[tuple[int, str]]]:
        idx = self.plan[b].tolist()
        out = torch.empty((len(idx), self.channels, *self.size), dtype=torch.uint8)
        bad: list[tuple[int, str]] = []
        for k, i in enumerate(idx):
            try:
                a = self.fetch(i)
                if a.shape[:2] != tuple(self.size):
                    raise ValueError(f"decoded to {a.shape[0]}x{a.shape[1]}, expected {self.size[0]}x{self.size[1]}")
                out[k] = _to_chw(a, self.channels)
            except Exception as err:  # reported by the main process, which knows the file names
                bad.append((k, f"{type(err).__name__}: {err}"))
        return out, bad


def _loader(dataset: Any, workers: int, **kw: Any) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers,
                                       prefetch_factor=_PREFETCH if workers else None,
                                       persistent_workers=False, **kw)


class StreamLoader:
    """The loader of :class:`StreamSource` (and of :class:`ShardSource` with ``rows`` or ``sample_weights``):
    ``TensorLoader``'s batches (same order, same rank slices), decoded by ``workers`` DataLoader processes.
    Same methods as ``TensorLoader``."""

    def __init__(self, source: Any, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 device: str | torch.device = "cpu", sample_weights: torch.Tensor | None = None, rank: int = 0,
                 world_size: int = 1, rows: torch.Tensor | None = None, drop_last: bool = False,
                 workers: int | None = None) -> None:
        self.source = source
        self.rows = None if rows is None else torch.as_tensor(rows, dtype=torch.long).cpu()
        labels = source.labels if self.rows is None else source.labels[self.rows]
        # the batch plan: a TensorLoader over zero-byte rows gives the order and the rank slices, the one rule
        self.plan = TensorLoader(torch.empty((len(labels), 0), dtype=torch.uint8), labels, batch_size,
                                 shuffle=shuffle, drop_last=drop_last, seed=seed, device="cpu",
                                 sample_weights=sample_weights, rank=rank, world_size=world_size)
        self.device = torch.device(device)
        self.world_size, self.rank, self.batch_size = world_size, rank, batch_size
        self.workers = source.workers if workers is None else workers

    def __len__(self) -> int:
        return len(self.plan)

    def order(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch`` (positions among ``rows`` when given), as ``TensorLoader.order``."""
        return self.plan.order(epoch).to(self.device)

    def global_batch_len(self, b: int) -> int:
        """Images in global batch ``b`` over all ranks."""
        return self.plan.global_batch_len(b)

    def indexed_batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(positions, uint8 images, labels)`` of each batch of ``epoch`` from batch ``start`` on."""
        steps = [(idx, labels) for idx, _, labels in self.plan.indexed_batches(epoch, start)]
        files = [idx if self.rows is None else self.rows[idx] for idx, _ in steps]
        yield from self.source._decoded(steps, files, self.workers, self.device)

    def batches(self, epoch: int = 0, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, labels)`` of each batch of ``epoch`` from batch ``start`` on."""
        for _, images, labels in self.indexed_batches(epoch, start):
            yield images, labels

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches(0)


class StreamSource:
    """Image files decoded on demand by worker processes (the ``"stream"`` tier).

    ``images``: an ``ImageList`` (``paths``, ``labels``, ``classes``, ``root``, ``name``, ``split``,
    ``notes``); ``decoder``: a ``Decoder`` (``fn(path) -> uint8 array`` of ``size``, ``channels``,
    ``grey_probe``). Unreadable files met while streaming are left out of their batch, named in one
    warning each (``strict`` makes them an error).
    """

    mode = "stream"

    def __init__(self, images: Any, decoder: Any, *, strict: bool = False, workers: int | None = None,
                 verbose: bool = False) -> None:
        if len(images) == 0:
            raise ValueError("expected at least one image, received an empty data set")
        self.paths: list[Path] = list(images.paths)
        self.labels = torch.as_tensor(list(images.labels), dtype=torch.long)
        self.classes = list(images.classes)
        self.root = Path(images.root)
        self.name = getattr(images, "name", "") or self.root.name
        self.split = getattr(images, "split", "")
        self.notes = list(getattr(images, "notes", []))
        self.source = str(self.root)
        self.decoder = decoder
        self.strict = strict
        self.workers = default_workers() if workers is None else int(workers)
        self.verbose = verbose
        self._channels = decoder.channels or self._probe_channels()
        self._warned: set[int] = set()

    def _probe_channels(self) -> int:
        """1 when every file's header says grey, else 3 (stops at the first colour file)."""
        probe = getattr(self.decoder, "grey_probe", None)
        if probe is None:
            return 3
        for p in self.paths:
            try:
                if not probe(p):
                    return 3
            except Exception:
                continue  # unreadable: reported when it is read
        return 1

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return (self._channels, *self.decoder.size)

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classes)

    def class_counts(self) -> list[int]:
        """Images per class."""
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def _fetch(self, i: int) -> np.ndarray:
        return self.decoder.fn(self.paths[i])

    def _name(self, i: int) -> str:
        return str(self.paths[i])

    def _size(self) -> tuple[int, int]:
        return tuple(self.decoder.size)

    def _bad(self, file_index: int, why: str) -> None:
        message = f"{self._name(file_index)}: unreadable while streaming ({why})"
        if self.strict:
            raise ValueError(message)
        if file_index not in self._warned:
            self._warned.add(file_index)
            warnings.warn(f"left out {message}", stacklevel=4)

    def _decoded(self, steps: list[tuple[torch.Tensor, torch.Tensor]], files: list[torch.Tensor], workers: int,
                 device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Decode ``files[b]`` for every step in worker processes, in order; yield (positions, images, labels)."""
        if not steps:
            return
        dataset = _Batches(self._fetch, self._size(), self.image_shape[0], files)
        pin = device.type == "cuda"
        for (idx, labels), fidx, (images, bad) in zip(steps, files, _loader(dataset, self.workers, pin_memory=pin)):
            if bad:
                for k, why in bad:
                    self._bad(int(fidx[k]), why)
                keep = torch.ones(len(idx), dtype=torch.bool)
                keep[[k for k, _ in bad]] = False
                idx, labels, images = idx[keep], labels[keep], images[keep]
            yield idx.to(device), images.to(device, non_blocking=pin), labels.to(device)

    def read(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The images at ``indices`` as uint8 (n, C, H, W), decoded here (unreadable files raise)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        images, bad = _Batches(self._fetch, self._size(), self.image_shape[0], [idx])[0]
        if bad:
            k, why = bad[0]
            raise ValueError(f"{self._name(int(idx[k]))}: unreadable ({why})")
        return images

    def batches(self, batch_size: int, indices: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(uint8 images, labels)`` in order (of ``indices`` when given), decoded by the workers."""
        idx = torch.arange(len(self)) if indices is None else torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        chunks = list(idx.split(batch_size))
        steps = [(c, self.labels[c]) for c in chunks]
        for _, images, labels in self._decoded(steps, chunks, self.workers, torch.device("cpu")):
            yield images, labels

    def loader(self, batch_size: int, **options: Any) -> StreamLoader:
        """A ``TensorLoader``-like loader (``shuffle``, ``seed``, ``device``, ``sample_weights``, ``rank``,
        ``world_size``, ``rows``, ``drop_last``, ``workers``) whose batches worker processes decode."""
        return StreamLoader(self, batch_size, **options)


# ------------------------------------------------------------------------------ WebDataset shards

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
        from imclass.data.shards import read_shard

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
                images[k] = _to_chw(self.decode(sample.data, sample.key), self.channels)
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
        for b, (keys, images, labels) in enumerate(_loader(self.stream(epoch), self.workers, pin_memory=pin)):
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
        from imclass.data.folder import parse_image_size
        from imclass.data.shards import ShardSet

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
        from imclass.data.decode import decode_array

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
