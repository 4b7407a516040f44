"""Batched augmentation: exact crops and flips, seeded reproducibility, cutout squares, the loader."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imclass.data.augment import CropFlip, cutout, make_augment, random_crop, random_flip
from imclass.data.loader import TensorLoader


def _batch(n=16, c=3, h=8, w=10, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def _find_offset(padded, out):
    """The (dy, dx) at which ``out`` is an exact window of ``padded``, or None."""
    h, w = out.shape[-2:]
    for dy in range(padded.shape[-2] - h + 1):
        for dx in range(padded.shape[-1] - w + 1):
            if torch.equal(padded[..., dy : dy + h, dx : dx + w], out):
                return dy, dx
    return None


@pytest.mark.parametrize("mode", ["reflect", "zeros"])
def test_random_crop_is_an_exact_window_of_the_padded_image(mode):
    x = _batch()
    out = random_crop(x, 3, torch.Generator().manual_seed(1), mode=mode)
    padded = F.pad(x, (3, 3, 3, 3), mode="reflect" if mode == "reflect" else "constant")
    offsets = [_find_offset(padded[i], out[i]) for i in range(len(x))]
    assert all(o is not None for o in offsets)
    assert len(set(offsets)) > 3  # different images get different shifts


def test_random_crop_offsets_cover_the_whole_range():
    x = torch.arange(6 * 6, dtype=torch.float32).reshape(1, 1, 6, 6).repeat(400, 1, 1, 1)
    out = random_crop(x, 2, torch.Generator().manual_seed(0), mode="zeros")
    padded = F.pad(x[:1], (2, 2, 2, 2))
    offsets = {_find_offset(padded[0], o) for o in out}
    assert offsets == {(dy, dx) for dy in range(5) for dx in range(5)}


def test_random_flip_mirrors_exactly_the_chosen_images():
    x = _batch(n=64)
    out = random_flip(x, torch.Generator().manual_seed(3))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 16 < sum(flipped) < 48
    assert torch.equal(random_flip(x, p=0.0), x)
    assert torch.equal(random_flip(x, p=1.0), x.flip(-1))


def test_cutout_zeroes_one_square_per_image():
    x = torch.ones(32, 3, 16, 16)
    out = cutout(x, 4, torch.Generator().manual_seed(0))
    zeros = (out == 0).all(1)  # (N, H, W): same mask in every channel
    assert torch.equal((out == 0).any(1), zeros)
    counts = zeros.sum((1, 2))
    assert counts.max() == 16 and counts.min() >= 4  # full square, or cut by the border
    for mask in zeros:
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        assert int(mask.sum()) == len(rows) * len(cols)  # a rectangle
        assert len(rows) <= 4 and len(cols) <= 4


def test_same_generator_seed_gives_the_same_output_and_different_seeds_differ():
    x = _batch(n=32, h=32, w=32)
    aug = CropFlip(padding=4, cutout=8)
    a = aug(x, torch.Generator().manual_seed(7), 0)
    b = aug(x, torch.Generator().manual_seed(7), 0)
    c = aug(x, torch.Generator().manual_seed(8), 0)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augment_errors_and_names():
    with pytest.raises(ValueError, match="padding >= 0"):
        random_crop(_batch(), -1)
    with pytest.raises(ValueError, match="mode in"):
        random_crop(_batch(), 2, mode="wrap")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        random_flip(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="crop_flip"):
        make_augment("rotate")
    assert make_augment("crop_flip") == CropFlip()
    assert make_augment(None) is None


def test_loader_covers_every_sample_once_per_epoch_and_reshuffles():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    labels = torch.arange(10)
    loader = TensorLoader(images, labels, batch_size=4, seed=0)
    assert len(loader) == 3
    e0 = torch.cat([y for _, y in loader.batches(0)])
    e1 = torch.cat([y for _, y in loader.batches(1)])
    assert sorted(e0.tolist()) == list(range(10)) and sorted(e1.tolist()) == list(range(10))
    assert not torch.equal(e0, e1)
    assert torch.equal(e0, torch.cat([y for _, y in TensorLoader(images, labels, 4, seed=0).batches(0)]))
    # resuming at batch 1 yields the same remaining batches
    assert torch.equal(torch.cat([y for _, y in loader.batches(0, start=1)]), e0[4:])
    for x, y in loader.batches(0):
        assert torch.equal(x.view(-1).long(), y)
    assert len(TensorLoader(images, labels, 4, drop_last=True)) == 2
    with pytest.raises(ValueError, match="batch_size >= 1"):
        TensorLoader(images, labels, 0)
