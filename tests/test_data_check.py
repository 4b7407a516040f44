"""``imclass data check`` and ``data info`` on folders the tests write from real CIFAR-10 images:
copied, resized, re-encoded, corrupted and duplicated, with the exact findings expected."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from conftest import evaluated_accuracy
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from imclass.cli import data as data_cli
from imclass.data import check as chk


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    data_cli.register(app)

    @app.callback()
    def root() -> None:  # keeps "data" a sub-command
        pass

    return app


def _cifar(cifar_npz, label: int, n: int, skip: int = 0) -> list[np.ndarray]:
    idx = np.flatnonzero(cifar_npz["y_train"] == label)[skip : skip + n]
    return [cifar_npz["x_train"][i] for i in idx]


def _save(array: np.ndarray, path: Path, size: tuple[int, int] = (64, 64), **kw) -> Path:
    """A CIFAR image upscaled to ``size`` (width, height), saved as the suffix says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).resize(size, Image.BILINEAR).save(path, **kw)
    return path


@pytest.fixture(scope="module")
def messy(tmp_path_factory, cifar_npz) -> Path:
    """train/{cat,dog} + val/{cat,dog} of 64x64 PNGs, an empty bird class, and planted problems."""
    root = tmp_path_factory.mktemp("messy") / "pets"
    cats, dogs = _cifar(cifar_npz, 3, 9), _cifar(cifar_npz, 5, 9)
    for i in range(6):
        _save(cats[i], root / "train" / "cat" / f"c{i}.png")
        _save(dogs[i], root / "train" / "dog" / f"d{i}.png")
    for i in (6, 7):
        _save(cats[i], root / "val" / "cat" / f"c{i}.png")
        _save(dogs[i], root / "val" / "dog" / f"d{i}.png")
    (root / "val" / "bird").mkdir()
    shutil.copy(root / "train" / "cat" / "c0.png", root / "train" / "cat" / "c0_copy.png")  # exact, within class
    shutil.copy(root / "train" / "cat" / "c1.png", root / "train" / "dog" / "c1_as_dog.png")  # exact, across classes
    _save(dogs[0], root / "val" / "dog" / "leak.jpg", size=(48, 48), quality=90)  # near, across splits; a JPEG
    _save(cats[2], root / "train" / "cat" / "c2_small.png", size=(56, 56))  # near, within class
    png = (root / "train" / "cat" / "c3.png").read_bytes()
    (root / "val" / "cat" / "broken.png").write_bytes(png[: len(png) // 3])  # truncated
    (root / "train" / "dog" / "notes.jpg").write_text("not a picture")  # unreadable
    _save(cats[8], root / "train" / "cat" / "tiny.png", size=(16, 16))
    _save(dogs[8], root / "train" / "dog" / "wide.png", size=(256, 64))
    return root


@pytest.fixture(scope="module")
def report(messy):
    return chk.check_folder(messy)


def test_unreadable_files_are_named(report):
    bad = {r["path"]: r["error"] for r in report["unreadable"]}
    assert set(bad) == {"train/dog/notes.jpg", "val/cat/broken.png"}
    assert bad["train/dog/notes.jpg"] == "not a readable image in an accepted format (expected JPEG, PNG, BMP, GIF, WebP or TIFF data)"
    assert "truncated" in bad["val/cat/broken.png"].lower() or "broken" in bad["val/cat/broken.png"].lower()


def test_exact_duplicates_within_and_across_classes(report):
    groups = sorted(report["exact_duplicates"], key=lambda g: g["files"])
    assert [(g["kind"], g["files"]) for g in groups] == [
        ("within class", ["train/cat/c0.png", "train/cat/c0_copy.png"]),
        ("across classes", ["train/cat/c1.png", "train/dog/c1_as_dog.png"]),
    ]
    assert groups[1]["classes"] == ["cat", "dog"]


def test_near_duplicates_resized_and_reencoded_copies(report):
    pairs = {tuple(g["files"]): g for g in report["near_duplicates"]}
    assert set(pairs) == {("train/cat/c2.png", "train/cat/c2_small.png"), ("train/dog/d0.png", "val/dog/leak.jpg")}
    leak = pairs[("train/dog/d0.png", "val/dog/leak.jpg")]
    assert leak["kind"] == "across splits" and leak["splits"] == ["train", "val"]
    assert pairs[("train/cat/c2.png", "train/cat/c2_small.png")]["kind"] == "within class"
    assert all(0 <= g["distance"] <= report["options"]["near_distance"] for g in pairs.values())


def test_formats_sizes_tiny_and_empty_classes(report):
    assert [(r["path"], r["format"]) for r in report["rare_formats"]] == [("val/dog/leak.jpg", "JPEG")]
    assert [(r["path"], r["height"], r["width"]) for r in report["tiny"]] == [("train/cat/tiny.png", 16, 16)]
    assert [r["path"] for r in report["size_outliers"]] == ["train/dog/wide.png"]
    assert "aspect ratio 4.00" in report["size_outliers"][0]["why"]
    assert report["empty_classes"] == ["train/bird", "val/bird"]
    assert report["classes"] == ["bird", "cat", "dog"] and report["class_counts"] == [0, 9, 9]
    assert report["imbalance"] is None  # cat 9 (with the copies), dog 9 (with notes.jpg); bird is empty
    assert report["images"] == 24


def test_nothing_is_changed(messy, app):
    before = {p: p.read_bytes() for p in messy.rglob("*") if p.is_file()}
    result = CliRunner().invoke(app, ["data", "check", str(messy)])
    assert result.exit_code == 0, result.output
    after = {p: p.read_bytes() for p in messy.rglob("*") if p.is_file()}
    assert before == after


def test_cli_table_and_json(messy, app):
    result = CliRunner().invoke(app, ["data", "check", str(messy)])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "exact duplicate groups                  2  1 within class, 1 across classes" in out
    assert "near duplicate pairs (<= 6 bits)        2  1 within class, 1 across splits" in out
    assert "unreadable files                        2" in out
    assert "[across splits, " in out and "train/dog/d0.png  val/dog/leak.jpg" in out
    result = CliRunner().invoke(app, ["data", "check", str(messy), "--json"])
    data = json.loads(result.stdout)
    assert data["summary"]["near_duplicates.across_splits"] == 1 and data["summary"]["tiny"] == 1


def test_imbalance_on_a_plain_tree(tmp_path, cifar_npz, app):
    for i, a in enumerate(_cifar(cifar_npz, 0, 9)):
        _save(a, tmp_path / "planes" / "airplane" / f"{i}.png")
    for i, a in enumerate(_cifar(cifar_npz, 1, 2)):
        _save(a, tmp_path / "planes" / "automobile" / f"{i}.png")
    report = chk.check_folder(tmp_path / "planes")
    assert report["layout"] == "plain"
    assert report["imbalance"] == {"ratio": 4.5, "largest": "airplane", "smallest": "automobile",
                                   "minority": ["automobile"], "counts": {"airplane": 9, "automobile": 2}}
    assert report["exact_duplicates"] == report["near_duplicates"] == []
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path / "planes")])
    assert "class imbalance                      4.5x  minority: automobile" in result.stdout


def test_bad_folder_and_options(tmp_path, app):
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "error: no such folder" in result.output
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "no class folders in" in result.output
    with pytest.raises(ValueError, match="expected 0 <= near_distance < 32, received near_distance=40"):
        chk.CheckOptions(near_distance=40)


def test_phash_matches_a_direct_2d_dct(cifar_npz):
    """The hash of one matrix product equals the signs of the 2-D DCT (float64) against their median."""
    grey = torch.from_numpy(cifar_npz["x_train"][:20].mean(-1)).double()  # (20, 32, 32)
    d = chk._dct_matrix(32)
    low = (d @ grey @ d.T)[:, :8, :8].reshape(20, -1)  # (20, 8, 8) -> (20, 64)
    expected = low > low[:, 1:].median(dim=1, keepdim=True).values
    assert torch.equal(chk.perceptual_hash(grey), expected)
    bits = chk.perceptual_hash(grey)
    d_ij = chk.hamming_pairs(bits, 64)
    assert len(d_ij) == 20 * 19 // 2
    i, j, dist = d_ij[7]
    assert dist == int((bits[i] != bits[j]).sum())


def test_quick_check_warns_at_train_start(messy, tmp_path, app):
    """imclass train on the messy folder warns about the two labels and the leakage, and still trains."""
    from imclass.workflows.training import RunConfig, train_from_config

    folder = tmp_path / "clean_copy"
    shutil.copytree(messy, folder)
    for bad in ("train/dog/notes.jpg", "val/cat/broken.png"):
        (folder / bad).unlink()
    cfg = RunConfig(model="mlp", model_options={"hidden": [8]}, dataset=str(folder), image_size=32, epochs=1,
                    out=str(tmp_path / "run"), verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train_from_config(cfg)
    messages = [str(w.message) for w in caught]
    assert any("1 pair(s) of (near) identical training images of clean_copy carry different labels" in m
               for m in messages), messages
    assert any("1 of the 5 test images of clean_copy are (near) identical to training images: leakage" in m
               for m in messages), messages
    assert result["test_images"] == 5
    assert result["accuracy"] == pytest.approx(evaluated_accuracy(tmp_path / "run", folder))  # the same 5 test images


def test_info_describes_mixed_sizes_and_formats(messy, app):
    result = CliRunner().invoke(app, ["data", "info", str(messy), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["layout"] == "split" and list(info["splits"]) == ["train", "val"]
    assert info["formats"] == {"PNG": 22, "JPEG": 1} and info["sizes"]["distinct"] == 5
    # headers only: the truncated PNG has a good header (data check decodes it and finds it broken)
    assert [u["path"] for u in info["unreadable"]] == ["train/dog/notes.jpg"]
    assert info["splits"]["train"]["class_counts"] == [0, 9, 9] and info["splits"]["train"]["image_shape"] is None
    assert info["sizes"]["most_common"][0] == {"height": 64, "width": 64, "count": 19}
    table = CliRunner().invoke(app, ["data", "info", str(messy)]).stdout
    assert "split tree, 24 images, 3 classes" in table and "formats  PNG 22, JPEG 1" in table


def test_info_on_the_flowers_photos(app, data_root):
    flowers = data_root / "flowers" / "photos"
    if not flowers.is_dir():
        pytest.skip(f"the flowers photos are not under {flowers}")
    info = json.loads(CliRunner().invoke(app, ["data", "info", str(flowers), "--json"]).stdout)
    assert info["class_counts"] == [633, 898, 641, 699, 799] and info["formats"] == {"JPEG": 3670}
    assert info["sizes"]["height"]["min"] == 144 and info["sizes"]["width"]["max"] == 789
    assert sum(info["splits"]["test"]["class_counts"]) == 735


# ------------------------------------------------------------------------------ the near-duplicate index

def _brute_pairs(a: np.ndarray, d: int, b: np.ndarray | None = None) -> list[tuple[int, int, int]]:
    """The search data check ran before the index: every pair's distance, row by row (the oracle)."""
    other = a if b is None else b
    dist = np.bitwise_count(a[:, None] ^ other[None, :])  # (N, M)
    hit = dist <= d
    if b is None:
        hit &= np.arange(len(other))[None, :] > np.arange(len(a))[:, None]
    return [(int(i), int(j), int(dist[i, j])) for i, j in zip(*np.nonzero(hit))]


def _planted(rng: np.random.Generator, n: int) -> np.ndarray:
    """n random 64-bit hashes, a third of them overwritten by copies of others with 0-4 bits flipped."""
    a = rng.integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)
    for _ in range(n // 3):
        h = a[rng.integers(n)]
        for bit in rng.choice(64, rng.integers(0, 5), replace=False):
            h ^= np.uint64(1) << np.uint64(bit)
        a[rng.integers(n)] = h
    return a


@pytest.mark.parametrize("seed", range(2))
def test_near_pairs_equal_the_brute_force(seed):
    """Multi-index hashing finds exactly the pairs (and distances, in the same order) of comparing all pairs,
    within one set and between two, for every distance from exact matches to all 64 bits."""
    from imclass.data.hamming import near_pairs

    rng = np.random.default_rng(seed)
    a, b = _planted(rng, 600), _planted(rng, 200)
    b[:50] = a[rng.integers(len(a), size=50)] ^ np.uint64(0b1011)  # cross-set pairs 3 bits apart
    for d in (0, 1, 2, 3, 6, 7, 12, 31, 64):
        hamming = chk.hamming_pairs(a, d)
        assert hamming == _brute_pairs(a, d), d
        assert chk.hamming_pairs(a, d, other=b) == _brute_pairs(a, d, b), d
        for blocks in (0, 1 + d // 3, d + 1) if d <= 12 else (0,):  # the chosen plan, 1-3 bits per block, exact blocks
            i, j, dist = near_pairs(a, d, budget=499, blocks=blocks or None)  # a small budget: many rounds
            assert list(zip(i.tolist(), j.tolist(), dist.tolist())) == hamming, (d, blocks)
    assert len(chk.hamming_pairs(a, 4)) > 100  # the planted pairs are there to be found


def test_near_pairs_on_real_images_equal_the_brute_force(cifar_npz):
    """On the pHashes of 3,000 CIFAR-10 photos (real near duplicates among them) the index gives the brute force's
    pairs, from bool bits (quick_check's input) as from packed hashes."""
    images = torch.from_numpy(cifar_npz["x_train"][:3000]).permute(0, 3, 1, 2)
    bits = chk.image_hashes(images)
    packed = chk.pack_hashes(bits)
    for d in (2, 6, 10):
        expected = _brute_pairs(packed, d)
        assert chk.hamming_pairs(bits, d) == expected
        assert chk.hamming_pairs(bits[:1000], d, other=bits[1000:]) == _brute_pairs(packed[:1000], d, packed[1000:])
    assert len(_brute_pairs(packed, 10)) > 0


def test_near_pairs_memory_is_linear():
    """100,000 hashes: peak traced memory stays within a few MB per 10,000 hashes (the brute force held a
    4,096 x N distance matrix: 3.3 GB at this N), and the search takes seconds, not minutes."""
    import time
    import tracemalloc

    from imclass.data.hamming import near_pairs

    a = _planted(np.random.default_rng(5), 100_000)
    tracemalloc.start()
    start = time.perf_counter()
    i, j, _ = near_pairs(a, 6)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(i) > 10_000  # the planted pairs
    assert peak < 150e6, f"peak {peak / 1e6:.0f} MB"
    assert seconds < 30, seconds
