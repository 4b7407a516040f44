"""Reproducible splits: the same seed gives the same images in each part, on every machine."""
from __future__ import annotations

import torch

from imclass.data.dataset import ImageDataset


def split_indices(
    labels: torch.Tensor, fraction: float, *, seed: int = 0, stratified: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``range(len(labels))`` into (kept, held_out) index tensors, both sorted.

    ``held_out`` gets ``round(fraction * n)`` items, drawn from each class separately when
    ``stratified`` (round(fraction * class size) per class), so class proportions are kept.
    The draw uses a ``torch.Generator`` seeded with ``seed``: it is reproducible across runs.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"expected a fraction strictly between 0 and 1, received {fraction}")
    labels = torch.as_tensor(labels).long().reshape(-1)
    gen = torch.Generator().manual_seed(int(seed))
    if stratified:
        groups = [torch.nonzero(labels == c).reshape(-1) for c in torch.unique(labels)]
    else:
        groups = [torch.arange(len(labels))]
    held = []
    for idx in groups:
        n_held = int(round(fraction * len(idx)))
        held.append(idx[torch.randperm(len(idx), generator=gen)[:n_held]])
    held_out = torch.sort(torch.cat(held)).values if held else torch.empty(0, dtype=torch.long)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_out] = False
    return torch.nonzero(mask).reshape(-1), held_out


def train_val_split(
    ds: ImageDataset, val_fraction: float = 0.1, seed: int = 0, stratified: bool = True
) -> tuple[ImageDataset, ImageDataset]:
    """Split a data set into (train, val), reproducibly; each keeps the original order.

    >>> import torch
    >>> ds = ImageDataset(torch.zeros(10, 1, 2, 2, dtype=torch.uint8), torch.arange(10) % 2, ["a", "b"])
    >>> train, val = train_val_split(ds, val_fraction=0.2, seed=0)
    >>> len(train), len(val), val.class_counts()
    (8, 2, [1, 1])
    """
    keep, held = split_indices(ds.labels, val_fraction, seed=seed, stratified=stratified)
    how = f"{val_fraction:g} of {ds.split or 'the data'} ({'stratified' if stratified else 'random'}, seed {seed})"
    train = ds.subset(keep, split="train")
    val = ds.subset(held, split="val")
    train.notes.append(f"train part left after holding out {how} for validation")
    val.notes.append(f"validation part: {how}")
    return train, val


def limit_indices(labels, limit: int | None, *, seed: int = 0, classes=None, where: str = "") -> torch.Tensor:
    """The one definition of ``--limit N``: a seeded, stratified sample of ``N`` items, as sorted indices.

    Every class keeps its share of the ``N`` items (largest remainder, so the counts add up to
    ``N``; a class present in ``labels`` gets at least one item while ``N`` allows it), drawn with a
    ``torch.Generator`` seeded with ``seed``: the same labels, ``N`` and seed give the same items on
    every machine, in every command. ``limit=None`` or ``limit >= len(labels)`` keeps everything.
    A class that ends up with no item is named in a warning (``classes`` gives the names, ``where``
    says which split). The indices are sorted, so the sample keeps the original order.

    >>> limit_indices(torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 4, seed=0).tolist()   # doctest: +SKIP
    [0, 3, 4, 6]
    """
    labels = torch.as_tensor(labels).long().reshape(-1)
    n = len(labels)
    if limit is None or limit >= n:
        return torch.arange(n)
    if limit < 1:
        raise ValueError(f"expected limit >= 1, received limit={limit}")
    present, counts = torch.unique(labels, return_counts=True)
    quota = _quotas(counts.tolist(), int(limit))
    gen = torch.Generator().manual_seed(int(seed))
    picked = []
    for cls, k in zip(present.tolist(), quota):
        idx = torch.nonzero(labels == cls).reshape(-1)
        picked.append(idx[torch.randperm(len(idx), generator=gen)[:k]])
    empty = [c for c, k in zip(present.tolist(), quota) if k == 0]
    if empty:
        import warnings

        names = [str(classes[c]) if classes is not None else str(c) for c in empty]
        shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
        warnings.warn(
            f"--limit {limit} leaves {len(empty)} of {len(present)} classes with no images"
            f"{' in the ' + where if where else ''} ({shown}); use --limit {len(present)} or more",
            stacklevel=2,
        )
    return torch.sort(torch.cat(picked)).values


def _quotas(counts: list[int], limit: int) -> list[int]:
    """``limit`` items shared among classes of ``counts`` sizes in proportion (largest remainder), adding up
    to ``limit``; while ``limit`` allows it, a class that would get none takes one from the class most above its exact share."""
    total = sum(counts)
    exact = [limit * c / total for c in counts]
    share = [int(e) for e in exact]
    order = sorted(range(len(counts)), key=lambda i: (-(exact[i] - share[i]), -counts[i], i))
    for i in order[: limit - sum(share)]:
        share[i] += 1
    for i in range(len(counts)):
        if share[i] == 0 and limit >= len(counts):
            # the class whose share most exceeds its exact share gives one (ties: the larger share)
            donor = max((j for j in range(len(counts)) if share[j] > 1), key=lambda j: (share[j] - exact[j], share[j], -j))
            share[donor] -= 1
            share[i] = 1
    return share


def limit_dataset(ds: ImageDataset, limit: int | None, *, seed: int = 0) -> ImageDataset:
    """``ds`` cut to ``limit`` images by :func:`limit_indices` (seeded, stratified); ``ds`` itself when
    ``limit`` is None or not smaller than ``len(ds)``."""
    if limit is None or limit >= len(ds):
        if limit is not None and limit < 1:
            raise ValueError(f"expected limit >= 1, received limit={limit}")
        return ds
    pick = limit_indices(ds.labels, limit, seed=seed, classes=ds.classes, where=f"{ds.split or 'data'} split")
    out = ds.subset(pick)
    out.notes.append(f"--limit {limit}: a seeded (seed {seed}), stratified sample of the {len(ds)} images")
    return out
