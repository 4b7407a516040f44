"""The one image-decoding gate (imclass.data.decode): formats, pixel limit and budget, reduced decoding,
16-bit / float pixels, EXIF orientation, special files, and errors that never echo internals."""
from __future__ import annotations

import io
import os
import subprocess
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from imclass import data
from imclass.data.decode import (
    ImageError, PixelBudget, decode_array, decode_image, probe_image,
)

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 0 lineto 16 16 lineto closepath fill\nshowpage\n%%EOF\n")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_postscript_is_refused_with_415_and_no_program_runs(tmp_path, monkeypatch):
    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # Pillow alone would take it (and run Ghostscript to load it)
    ran = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: ran.append(a) or pytest.fail("a program was started"))
    monkeypatch.setattr(subprocess, "check_call", lambda *a, **k: ran.append(a) or pytest.fail("a program was started"))
    for source, label in ((EPS, "upload"), (str(tmp_path / "x.png"), str(tmp_path / "x.png"))):
        (tmp_path / "x.png").write_bytes(EPS)  # an EPS named .png
        with pytest.raises(ImageError) as err:
            decode_array(source)
        assert err.value.status == 415
        assert str(err.value) == (f"{label}: not a readable image in an accepted format "
                                  "(expected JPEG, PNG, BMP, GIF, WebP or TIFF data)")
        with pytest.raises(ImageError, match="accepted format"):
            probe_image(source)
    assert ran == []


def test_errors_name_the_image_by_its_label_only(tmp_path):
    good = _png(np.zeros((40, 40, 3), np.uint8))
    for bad, status, reason in (
        (good[:60], 422, "not a readable image: corrupt or truncated data (OSError)"),
        (b"", 415, "empty file, expected an image (JPEG, PNG, BMP, GIF, WebP or TIFF)"),
    ):
        with pytest.raises(ImageError) as err:
            decode_array(bad, name="cat.png")
        assert (err.value.status, str(err.value), err.value.reason) == (status, f"cat.png: {reason}", reason)
        assert "/tmp" not in str(err.value) and "gs " not in str(err.value)
    with pytest.raises(ImageError) as err:
        decode_array(tmp_path / "absent.png")
    assert str(err.value) == f"{tmp_path / 'absent.png'}: no such image file"


def test_pixel_limit_from_the_header_before_decoding():
    # 9,000 x 9,000 one-bit pixels: a 10 MB raster, 81 M pixels, refused from its header
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, format="PNG")
    with pytest.raises(ImageError) as err:
        decode_array(bomb.getvalue(), name="bomb.png")
    assert err.value.status == 413
    assert str(err.value) == "bomb.png: image of 9000 x 9000 = 81,000,000 pixels exceeds the limit of 40,000,000"


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65,520
    got = decode_array(_png(ramp))
    assert got.dtype == np.uint8 and got.shape == (64, 64)
    np.testing.assert_array_equal(got, np.rint(ramp / 257.0).astype(np.uint8))
    assert decode_image(_png(ramp)).shape == (3, 64, 64)  # colour asked for: the same grey on R, G and B

    floats = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    floats[0, 0] = np.nan
    Image.fromarray(floats).save(tmp_path / "f.tif")
    got = decode_array(tmp_path / "f.tif")
    expected = np.rint(np.nan_to_num(floats, nan=0.0) * 255).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)
    assert got.max() == 255 and got[0, 1] == 4  # 1/63 * 255, not black


def _oriented_jpeg(path, orientation: int) -> np.ndarray:
    """A 40 x 20 (w x h) JPEG, left half red, right half blue, with an EXIF orientation tag."""
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = (255, 0, 0)
    a[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(a).save(path, quality=100, exif=exif.tobytes())
    return a


def test_exif_orientation_is_applied_the_same_everywhere(tmp_path):
    (tmp_path / "cls").mkdir()
    path = tmp_path / "cls" / "a.jpg"
    _oriented_jpeg(path, 6)  # stored sideways: viewers turn it 90 degrees clockwise
    info = probe_image(path)
    assert (info.height, info.width) == (40, 20)
    got = decode_array(path)
    assert got.shape == (40, 20, 3)
    assert got[5, 10, 0] > 200 and got[5, 10, 2] < 50  # orientation 6: the left (red) half ends on top
    assert got[35, 10, 2] > 200 and got[35, 10, 0] < 50
    # the folder loader and the predictor decode the same pixels
    (tmp_path / "other").mkdir()
    Image.fromarray(np.zeros((40, 20, 3), np.uint8)).save(tmp_path / "other" / "b.png")
    ds = data.load(tmp_path, split="all")
    assert torch.equal(ds.images[0], torch.from_numpy(got).permute(2, 0, 1))
    assert torch.equal(decode_image(path.read_bytes()), ds.images[0])


def test_small_targets_decode_jpegs_reduced_and_within_the_budget():
    big = np.random.default_rng(0).integers(0, 256, (1600, 2400, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, format="JPEG", quality=90)
    held = []

    class Recording(PixelBudget):
        def acquire(self, n: int) -> None:
            held.append(n)
            super().acquire(n)

    budget = Recording(1 << 30)
    small = decode_array(buf.getvalue(), size=(32, 32), budget=budget)
    assert small.shape == (32, 32, 3)
    assert held == [300 * 200 * 8]  # drafted at 1/8 scale (300 x 200 pixels), never the 2,400 x 1,600 raster
    full = decode_array(buf.getvalue(), budget=budget)
    assert full.shape == (1600, 2400, 3) and held[-1] == 2400 * 1600 * 8
    assert budget.in_use == 0


def test_concurrent_decodes_share_one_budget():
    image = _png(np.random.default_rng(1).integers(0, 256, (500, 600, 3), dtype=np.uint8))
    cost = 500 * 600 * 8
    budget = PixelBudget(2 * cost)  # room for two decodes at a time
    peak = []
    original = budget.acquire

    def acquire(n: int) -> None:
        original(n)
        peak.append(budget.in_use)

    budget.acquire = acquire  # type: ignore[method-assign]
    threads = [threading.Thread(target=decode_array, args=(image,), kwargs={"budget": budget}) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(peak) == 8 and max(peak) <= 2 * cost and budget.in_use == 0


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    start = time.perf_counter()
    with pytest.raises(ImageError) as err:
        decode_array(fifo)
    assert time.perf_counter() - start < 2
    assert err.value.status == 415
    assert str(err.value) == f"{fifo}: not a regular file (FIFO, socket or device), expected an image file"


def test_tiff_is_read_by_folders_and_predict_alike(tmp_path):
    for cls, value in (("a", 10), ("b", 200)):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(tmp_path / cls / "x.tif")
        Image.fromarray(np.full((6, 6, 3), value, np.uint8)).save(tmp_path / cls / "y.png")
    ds = data.load(tmp_path, split="all")
    assert ds.class_counts() == [2, 2]
    assert torch.equal(decode_image(tmp_path / "b" / "x.tif"), torch.full((3, 6, 6), 200, dtype=torch.uint8))
