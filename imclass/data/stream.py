"""The stream tier: images decoded batch by batch by DataLoader worker processes, nothing held.

Two sources, one contract (``imclass.data.source.ImageSource``: ``mode``, ``labels``, ``classes``,
``image_shape``, ``read``, ``batches``, ``loader``):

* :class:`StreamSource` over image files (an ``ImageList`` and a ``Decoder`` of the tier
  interface). Its loader draws exactly the batches of the in-memory ``TensorLoader`` (the same
  seeded permutation of ``(seed, epoch)``, each rank's contiguous slice of every global batch),
  and worker processes decode them: the same batches as the memory and cache tiers, so training
  on a folder gives the same figures in every tier, and under DDP the ranks read disjoint files.
* ``imclass.data.shards.ShardSource`` over WebDataset tar shards written by ``imclass data shard``
  (a subclass of :class:`StreamSource`, in ``imclass.data.shards``). timm's ``ReaderWds`` pattern: each epoch draws a seeded order of
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

from imclass.data.loader import TensorLoader
from imclass.data.malloc import M_MMAP_MAX, M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, mallopt

__all__ = ["StreamLoader", "StreamSource", "default_workers", "to_chw", "worker_loader"]

_PREFETCH = 2  # batches each worker decodes ahead


def default_workers() -> int:
    """DataLoader worker processes when none are asked for: the CPU cores this process may use, shared among
    the ranks torchrun started on this machine (``LOCAL_WORLD_SIZE``), at least 1 and at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    ranks_here = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(1, min(8, cores // ranks_here))


def to_chw(a: np.ndarray, channels: int) -> torch.Tensor:
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
                out[k] = to_chw(a, self.channels)
            except Exception as err:  # reported by the main process, which knows the file names
                bad.append((k, f"{type(err).__name__}: {err}"))
        return out, bad


def bound_worker_heap(worker_id: int) -> None:
    """A DataLoader worker's start (glibc): blocks of 1 MiB and more are mapped and returned to the system
    when freed, with a fixed threshold. A worker makes a 12 MB batch, hands it over in shared memory and
    frees it, over and over; with glibc's default *dynamic* threshold those blocks move onto the heap,
    which fragments, and a worker's private memory wandered from 40 MB to 450 MB between identical runs
    (20,000 photos, 2 workers). It also undoes, in the worker only, a parent's ``retain_freed_memory``
    (which keeps every block on the heap: right for training's steady-state buffers, not for this)."""
    setting = mallopt()
    if setting is not None:
        setting(M_MMAP_MAX, 65536)
        setting(M_MMAP_THRESHOLD, 1 << 20)
        setting(M_TRIM_THRESHOLD, 2 << 20)


def worker_loader(dataset: Any, workers: int, **kw: Any) -> torch.utils.data.DataLoader:
    """A DataLoader yielding ``dataset``'s items as they are (each item is a whole batch), ``workers`` processes
    (each with a bounded heap: ``bound_worker_heap``)."""
    # a generator of its own: iterating a DataLoader draws its workers' base seed from the generator it is
    # given, else from torch's global one, which would shift the training's dropout draws (tiers must agree)
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    kw.setdefault("worker_init_fn", bound_worker_heap)
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
        self.paths: Sequence[Path] = images.paths  # a PathTable from a folder walk: text, each Path made when read
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
        for (idx, labels), fidx, (images, bad) in zip(steps, files, worker_loader(dataset, self.workers, pin_memory=pin)):
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
