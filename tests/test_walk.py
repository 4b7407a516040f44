"""The one folder walk (imclass.data.walk): symlink loops, links between classes, FIFOs and other
special files, broken links; every consumer (load, info, check, predict) counts each real image once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from imclass import data
from imclass.data.check import check_folder
from imclass.data.inspect import inspect_folder
from imclass.data.walk import walk_classes, walk_images
from imclass.serve.predictor import find_images


def _photos(root, counts={"daisy": 3, "roses": 2}):
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 40 * i + (100 if cls == "roses" else 0), np.uint8)).save(
                root / cls / f"{i}.png")
    return root


@pytest.fixture
def hostile(tmp_path):
    """Photos with a loop back to the root, a FIFO named .jpg, a link into another class, a broken link,
    a hidden file and a text file."""
    root = _photos(tmp_path / "photos")
    os.symlink("..", root / "daisy" / "loop")
    os.mkfifo(root / "daisy" / "x.jpg")
    os.symlink("../roses", root / "daisy" / "more")
    os.symlink("missing.png", root / "roses" / "gone.png")
    (root / "roses" / ".DS_Store").write_bytes(b"\0")
    (root / "roses" / "notes.txt").write_text("hello")
    sub = root / "roses" / "deeper"
    sub.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(sub / "d.png")
    os.symlink(str(sub), root / "roses" / "again")  # a second link to a folder already read
    return root


EXPECTED_SKIP = (
    "skipped 7 entries under {root}: 3 folder already read (a symlink loop or a second link to it): "
    "daisy/loop, daisy/more, roses/again; 1 not a regular file (FIFO, socket or device): daisy/x.jpg; "
    "1 broken symbolic link: roses/gone.png; 1 not an image file name (.jpg .jpeg .png .bmp .gif .webp .tif .tiff): "
    "roses/notes.txt; 1 hidden (name starts with '.'): roses/.DS_Store"
)


def test_walk_reads_each_real_folder_once_and_names_every_skip(hostile):
    found = walk_classes(hostile, ["daisy", "roses"])
    assert [p.relative_to(hostile).as_posix() for p in found.paths] == [
        "daisy/0.png", "daisy/1.png", "daisy/2.png", "roses/0.png", "roses/1.png", "roses/deeper/d.png"]
    assert found.labels == [0, 0, 0, 1, 1, 1]
    assert found.message(hostile) == EXPECTED_SKIP.format(root=hostile)


def test_walk_of_one_folder_follows_a_link_once(tmp_path):
    root = _photos(tmp_path / "p", {"a": 2})
    os.symlink(str(root / "a"), root / "b")  # the same folder twice under one root
    os.symlink("..", root / "a" / "up")
    walk = walk_images(root)
    assert [p.relative_to(root).as_posix() for p in walk.files] == ["a/0.png", "a/1.png"]
    assert sorted(k for _, k in walk.skipped) == ["repeated folder", "repeated folder"]


def test_load_info_check_and_predict_count_each_image_once(hostile):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = data.load(hostile, split="all")
        listed = find_images([hostile])
    assert ds.class_counts() == [3, 3]
    assert [str(w.message) for w in caught] == [EXPECTED_SKIP.format(root=hostile)] * 2
    assert len(listed) == 6

    info = inspect_folder(hostile)
    assert info["class_counts"] == [3, 3] and info["unreadable"] == []
    assert EXPECTED_SKIP.format(root=hostile) in info["notes"]

    report = check_folder(hostile)
    assert report["images"] == 6 and report["skipped"] == EXPECTED_SKIP.format(root=hostile)


def test_data_info_command_finishes_promptly_on_a_loop_and_a_fifo(hostile):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "imclass", "data", "info", str(hostile), "--json"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    assert time.perf_counter() - start < 120
    info = json.loads(result.stdout)
    assert info["class_counts"] == [3, 3] and info["size"] == 6
    assert any("daisy/x.jpg" in n and "daisy/loop" in n for n in info["notes"])


def test_walk_stats_are_each_files_own_path_size_and_mtime(tmp_path, monkeypatch):
    """The walk's one stat per file is what a cache key needs: the path as os.fspath gives it (from an
    absolute root, a relative one, '.' and one with a trailing slash), st_size and st_mtime_ns; files
    are in Path order (a sub-folder 'a' before a file 'a-b.png', whose '-' sorts before '/' as text)."""
    root = _photos(tmp_path / "photos")
    (root / "daisy" / "a").mkdir()
    Image.new("RGB", (4, 4)).save(root / "daisy" / "a" / "z.png")
    Image.new("RGB", (4, 4)).save(root / "daisy" / "a-b.png")
    os.utime(root / "daisy" / "0.png", ns=(1, 1_234_567_891_234_567_890))
    monkeypatch.chdir(tmp_path)
    for start in (root, "photos", "photos/", "./photos/daisy/.."):
        found = walk_images(start)
        assert found.files == sorted(found.files) and len(found.files) == 7
        assert found.stats == [(os.fspath(p), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in found.files]
    monkeypatch.chdir(root)
    here = walk_classes(".", ["daisy", "roses"])
    assert [s[0] for s in here.stats] == [os.fspath(p) for p in here.paths] and here.stats[0][0] == "daisy/0.png"
    assert here.stats[0][2] == 1_234_567_891_234_567_890


def test_a_listing_keeps_paths_as_text_and_reads_them_as_paths(tmp_path):
    """A walk's paths are a PathTable: the text of each entry (os.fspath of folder / name), read back as the
    Path the walk found, by index, slice, ``take`` (kept rows, in that order) and iteration; it pickles as
    text (a stream tier's workers under spawn) and compares equal to the list of the same paths."""
    import pickle

    from imclass.data.walk import PathTable, take_paths

    root = _photos(tmp_path / "photos")
    listing = walk_classes(root, ["daisy", "roses"])
    expected = sorted((root / "daisy").glob("*.png")) + sorted((root / "roses").glob("*.png"))
    assert isinstance(listing.paths, PathTable) and listing.paths == expected and list(listing.paths) == expected
    assert listing.paths.texts == [os.fspath(p) for p in expected]
    assert listing.paths[1] == expected[1] and isinstance(listing.paths[1], type(expected[1]))
    assert listing.paths[1:3] == expected[1:3] and isinstance(listing.paths[1:3], PathTable)
    assert take_paths(listing.paths, [3, 0]) == [expected[3], expected[0]]
    assert take_paths(expected, [3, 0]) == [expected[3], expected[0]]  # a plain list too
    assert pickle.loads(pickle.dumps(listing.paths)) == listing.paths
    assert listing.paths != expected[:-1] and (listing.paths + [root / "x.png"])[-1] == root / "x.png"
