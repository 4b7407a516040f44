"""``imclass data info|show|list`` through typer's CliRunner."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from imclass.cli import data as data_cli


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    data_cli.register(app)

    @app.callback()
    def root() -> None:  # keeps "data" a sub-command even though it is the only group here
        pass

    return app


def run(app, *args):
    return CliRunner().invoke(app, list(args))


def test_info_json_reports_each_split(app, data_root):
    result = run(app, "data", "info", "cifar10", "--data", str(data_root), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    train, test = info["splits"]["train"], info["splits"]["test"]
    assert info["name"] == "cifar10"
    assert train["size"] == 50000 and train["image_shape"] == [3, 32, 32] and train["dtype"] == "uint8"
    assert train["class_counts"] == [5000] * 10 and train["classes"][0] == "airplane"
    assert test["size"] == 10000 and test["class_counts"] == [1000] * 10
    assert test["notes"] == []


def test_info_table_for_one_split(app, data_root):
    result = run(app, "data", "info", "mnist", "--data", str(data_root), "--split", "test")
    assert result.exit_code == 0, result.output
    assert "test     10,000 images  1x28x28 uint8  10 classes" in result.stdout
    assert re.search(r"^  1 +1,135$", result.stdout, re.MULTILINE)  # class "1" of the MNIST test set


def test_unknown_name_lists_the_known_ones(app, data_root):
    result = run(app, "data", "info", "imagenet", "--data", str(data_root))
    assert result.exit_code == 2
    assert "unknown data set 'imagenet': expected one of cifar10, mnist, fashion-mnist" in result.output


def test_show_writes_one_labelled_row_per_class(app, data_root, cifar_npz, tmp_path):
    out = tmp_path / "grid.png"
    result = run(app, "data", "show", "cifar10", "--data", str(data_root), "--out", str(out), "--per-class", "3")
    assert result.exit_code == 0, result.output
    grid = np.asarray(Image.open(out).convert("RGB"))
    # label column 90 px, tiles 32 px scaled x2 with 2 px padding: 10 rows of 3
    assert grid.shape == (10 * 66 + 2, 90 + 3 * 66 + 2, 3)
    x, y = cifar_npz["x_train"], cifar_npz["y_train"]
    first_rows = np.ascontiguousarray(x[:, 0])  # (N, 32, 3): a cheap first filter before whole images
    for row in range(10):  # every tile is a training image of the row's class
        for col in range(3):
            top, left = 2 + row * 66, 90 + 2 + col * 66
            tile = grid[top : top + 64 : 2, left : left + 64 : 2]
            candidates = np.flatnonzero((first_rows == tile[0]).all(axis=(1, 2)))
            assert any(y[i] == row and (x[i] == tile).all() for i in candidates), (row, col)
    again = tmp_path / "again.png"
    run(app, "data", "show", "cifar10", "--data", str(data_root), "--out", str(again), "--per-class", "3")
    assert again.read_bytes() == out.read_bytes()  # same seed, same picture


def test_info_on_a_folder_tree(app, tmp_path):
    for split, n in (("train", 3), ("test", 1)):
        for cls in ("ant", "bee"):
            for i in range(n):
                path = tmp_path / "bugs" / split / cls / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (5, 4), (i, 0, 0)).save(path)
    result = run(app, "data", "info", str(tmp_path / "bugs"), "--json")
    assert result.exit_code == 0, result.output
    splits = json.loads(result.stdout)["splits"]
    assert list(splits) == ["train", "test"]
    assert splits["train"]["class_counts"] == [3, 3] and splits["test"]["image_shape"] == [3, 4, 5]
