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
