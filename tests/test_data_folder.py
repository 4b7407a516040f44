"""Class-per-folder image trees: formats, sizes, grey/colour, unreadable files, split layouts."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import imclass.data as data
from imclass.data.folder import UnreadableImageError

FORMATS = [("png", {}), ("bmp", {}), ("webp", {"lossless": True}), ("gif", {})]  # lossless: pixels are exact


def _colour(label: int, index: int) -> tuple[int, int, int]:
    """A solid colour that encodes (class, image): lets a test find each image in the tensor."""
    return (40 * label + 10, 20 * index + 5, 99)


def _write(path, size_hw=(8, 8), colour=(1, 2, 3), mode="RGB", **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size_hw[1], size_hw[0]), colour if mode != "L" else colour[0]).save(path, **save)


def _tree(root, classes=("cat", "dog", "frog"), per_class=10, size_hw=(8, 8)):
    """root/<class>/<i>.<fmt>, cycling through the lossless formats."""
    for label, name in enumerate(classes):
        for i in range(per_class):
            ext, opts = FORMATS[i % len(FORMATS)]
            _write(root / name / f"{i:02d}.{ext}", size_hw, _colour(label, i), **opts)
    return root


def _ids(ds) -> set[tuple[int, int]]:
    """(class, image index) decoded from the solid colours."""
    px = ds.images[:, :, 0, 0]
    return {(int(r - 10) // 40, int(g - 5) // 20) for r, g, _ in px.tolist()}


def test_plain_tree_splits_80_20_per_class_reproducibly(tmp_path):
    root = _tree(tmp_path / "pets")
    train = data.load(root, split="train")
    test = data.load(str(root), split="test")
    assert train.classes == test.classes == ["cat", "dog", "frog"]
    assert train.class_counts() == [8, 8, 8] and test.class_counts() == [2, 2, 2]
    assert train.images.shape == (24, 3, 8, 8) and train.images.dtype == torch.uint8
    assert _ids(train).isdisjoint(_ids(test))
    assert _ids(train) | _ids(test) == {(c, i) for c in range(3) for i in range(10)}
    for ds in (train, test):  # every image carries the label of its folder
        assert [int(r - 10) // 40 for r in ds.images[:, 0, 0, 0].tolist()] == ds.labels.tolist()
    again = data.load(root, split="test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    assert "seed 0" in test.notes[0] and test.name == "pets"
    everything = data.load(root, split="all")
    assert len(everything) == 30 and everything.notes == []
    with pytest.raises(ValueError, match=r"expected split 'train', 'test' or 'all'.*train_val_split"):
        data.load(root, split="val")


def test_split_tree_uses_its_folders_and_the_union_of_classes(tmp_path):
    root = tmp_path / "tree"
    _tree(root / "train", classes=("bird", "cat", "dog"), per_class=3)
    for i in range(2):
        _write(root / "test" / "dog" / f"{i}.png", colour=_colour(2, i))
        _write(root / "test" / "cat" / f"{i}.png", colour=_colour(1, i))
    train = data.load(root, "train")
    test = data.load(root, "test")
    assert train.classes == test.classes == ["bird", "cat", "dog"]
    assert train.class_counts() == [3, 3, 3] and test.class_counts() == [0, 2, 2]
    assert test.labels.tolist() == [1, 1, 2, 2] and test.notes == []
    with pytest.raises(ValueError, match=r"has split folders train, test, received split='val'.*train_val_split"):
        data.load(root, "val")


def test_val_folder_serves_as_test_when_there_is_no_test_folder(tmp_path):
    root = tmp_path / "tree"
    _tree(root / "train", classes=("a", "b"), per_class=2)
    _tree(root / "val", classes=("a", "b"), per_class=1)
    assert len(data.load(root, "val")) == 2
    test = data.load(root, "test")
    assert len(test) == 2 and "val/ is used as the test split" in test.notes[0]


def test_mixed_sizes_need_image_size(tmp_path):
    root = _tree(tmp_path / "mixed", per_class=4)
    _write(root / "cat" / "big.png", (16, 12), (200, 0, 0))
    _write(root / "dog" / "tall.jpg", (30, 10), (0, 200, 0))
    with pytest.raises(ValueError) as err:
        data.load(root, split="all")
    message = str(err.value)
    assert "3 different sizes (height x width): 8x8 (12 files" in message
    assert "16x12 (1 file, e.g. cat/big.png)" in message and "30x10 (1 file, e.g. dog/tall.jpg)" in message
    assert "pass image_size=8 or image_size=(8, 8)" in message
    ds = data.load(root, split="all", image_size=(6, 10))
    assert ds.images.shape == (14, 3, 6, 10)
    big = ds.images[ds.labels == 0][-1]  # cat/big.png sorts after 00.png .. 03.gif
    assert big[:, 3, 5].tolist() == [200, 0, 0]  # a solid colour stays that colour after resizing
    assert data.load(root, split="all", image_size=5).images.shape == (14, 3, 5, 5)


def test_unreadable_files_are_skipped_with_one_warning_or_raise_when_strict(tmp_path):
    root = _tree(tmp_path / "broken", per_class=3)
    (root / "cat" / "bad.png").write_bytes(b"this is not a png")
    good = root / "dog" / "00.png"
    (root / "dog" / "cut.png").write_bytes(good.read_bytes()[:40])  # truncated
    (root / "dog" / "notes.txt").write_text("skipped: not an image extension")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.load(root, split="all")
    assert len(caught) == 2  # one for what the walk skipped, one for what the decoder refused
    assert str(caught[0].message) == (f"skipped 1 entry under {root}: 1 not an image file name "
                                      "(.jpg .jpeg .png .bmp .gif .webp .tif .tiff): dog/notes.txt")
    message = str(caught[1].message)
    assert message.startswith(f"skipped 2 unreadable image file(s) in {root}: cat/bad.png (")
    assert "dog/cut.png" in message and "strict=True" in message
    assert ds.class_counts() == [3, 3, 3]
    with pytest.raises(UnreadableImageError, match=r"2 unreadable image file\(s\) .*cat/bad.png.*dog/cut.png"):
        data.load(root, split="all", strict=True)


def test_grey_images_keep_one_channel_and_mixed_become_rgb(tmp_path):
    grey = tmp_path / "grey"
    for i in range(3):
        _write(grey / "a" / f"{i}.png", colour=(10 * i, 0, 0), mode="L")
        _write(grey / "b" / f"{i}.jpg", colour=(100, 0, 0), mode="L", quality=100)
    ds = data.load(grey, split="all")
    assert ds.images.shape == (6, 1, 8, 8)
    assert ds.images[:3, 0, 0, 0].tolist() == [0, 10, 20]
    assert abs(int(ds.images[3, 0, 4, 4]) - 100) <= 1

    _write(grey / "c" / "colour.png", colour=(1, 2, 3))
    _write(grey / "c" / "alpha.png", colour=(7, 8, 9, 128), mode="RGBA")
    mixed = data.load(grey, split="all")
    assert mixed.images.shape == (8, 3, 8, 8)
    assert mixed.images[1, :, 0, 0].tolist() == [10, 10, 10]  # grey repeated over R, G and B
    assert mixed.images[mixed.labels == 2][:, :, 0, 0].tolist() == [[7, 8, 9], [1, 2, 3]]  # alpha dropped


def test_empty_or_flat_folders_are_explained(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class folders in .*empty: expected one sub-folder per class"):
        data.load(tmp_path / "empty", split="all")
    (tmp_path / "noimg" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files"):
        data.load(tmp_path / "noimg", split="all")
    with pytest.raises(ValueError, match="unknown data set .*no folder .*missing exists"):
        data.load(tmp_path / "missing")


def test_folder_images_match_pillow_decoding_of_a_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    path = tmp_path / "jpg" / "x" / "photo.JPG"  # upper-case extension counts too
    path.parent.mkdir(parents=True)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    ds = data.load(tmp_path / "jpg", split="all")
    expected = np.array(Image.open(path).convert("RGB"))
    assert torch.equal(ds.images[0], torch.from_numpy(expected).permute(2, 0, 1))


def test_read_image_one_file(tmp_path):
    from imclass.data import read_image

    grey = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    t = read_image(tmp_path / "grey.png")
    assert t.dtype == torch.uint8 and t.shape == (1, 12, 10) and torch.equal(t[0], torch.from_numpy(grey))
    rgb = read_image(tmp_path / "grey.png", channels=3)
    assert rgb.shape == (3, 12, 10) and all(torch.equal(rgb[c], t[0]) for c in range(3))
    assert read_image(tmp_path / "grey.png", size=(6, 5), channels=3).shape == (3, 6, 5)
    with pytest.raises(ValueError, match=r"missing\.png: no such image file"):
        read_image(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"bad\.png: not a readable image"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"expected channels 1, 3 or None, received channels=4"):
        read_image(tmp_path / "grey.png", channels=4)
