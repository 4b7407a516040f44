"""`--limit N`: one definition (a seeded, stratified sample of each split) in every command and API."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image

from imclass.data.split import limit_dataset, limit_indices


@pytest.fixture(scope="module")
def ordered_folder(tmp_path_factory):
    """A plain class-per-folder tree of 4 classes (40, 40, 40, 10 images), listed class by class: the
    first N files of it are all of the first class. Each class has its own colour."""
    import numpy as np

    root = tmp_path_factory.mktemp("ordered")
    rng = np.random.default_rng(0)
    for c, (name, n) in enumerate([("a", 40), ("b", 40), ("c", 40), ("d", 10)]):
        (root / name).mkdir()
        for i in range(n):
            pixels = rng.integers(0, 256, (12, 12 + i % 3, 3), dtype=np.uint8)
            pixels[..., c % 3] = 60 * c  # a class colour under random noise
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def test_every_class_keeps_its_share_and_the_counts_add_up():
    labels = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    for seed in range(5):
        pick = limit_indices(labels, 100, seed=seed)
        assert len(pick) == 100 and torch.equal(pick, pick.sort().values) and len(set(pick.tolist())) == 100
        assert torch.bincount(labels[pick]).tolist() == [60, 30, 10]
    assert torch.equal(limit_indices(labels, 100, seed=3), limit_indices(labels, 100, seed=3))  # seeded
    assert not torch.equal(limit_indices(labels, 100, seed=3), limit_indices(labels, 100, seed=4))
    # a rare class still gets one image while N allows it, and the total stays N
    rare = torch.tensor([0] * 500 + [1] * 2 + [2] * 498)
    assert torch.bincount(rare[limit_indices(rare, 10)]).tolist() == [5, 1, 4]
    assert limit_indices(labels, None).tolist() == list(range(1000)) and len(limit_indices(labels, 5000)) == 1000
    with pytest.raises(ValueError, match="expected limit >= 1, received limit=0"):
        limit_indices(labels, 0)


def test_a_class_left_empty_is_named_in_a_warning():
    labels = torch.tensor([0] * 5 + [1] * 5 + [2] * 5)
    with pytest.warns(UserWarning, match=r"--limit 2 leaves 1 of 3 classes with no images in the train split \(cat\)"):
        pick = limit_indices(labels, 2, classes=["ant", "bee", "cat"], where="train split")
    assert torch.bincount(labels[pick], minlength=3).tolist() == [1, 1, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        limit_indices(labels, 3)  # every class present: no warning


def test_load_of_a_class_ordered_folder_samples_every_class(ordered_folder):
    import imclass

    full = imclass.data.load(ordered_folder, split="train", image_size=12)
    small = imclass.data.load(ordered_folder, split="train", image_size=12, limit=13, seed=1)
    assert len(small) == 13 and set(small.labels.tolist()) == {0, 1, 2, 3}
    again = limit_dataset(full, 13, seed=1)  # the same rule on a loaded set gives the same images
    assert torch.equal(again.images, small.images) and torch.equal(again.labels, small.labels)


def test_transfer_reading_samples_every_class_of_every_split(ordered_folder):
    from imclass.models.weights import Preprocessing
    from imclass.transfer.workflow import load_for, read_folder_for

    pre = Preprocessing(input_size=(3, 12, 12), resize=12, crop=12, mean=(0.5,) * 3, std=(0.5,) * 3)
    train, val, _ = read_folder_for(ordered_folder, pre, val_fraction=0.25, seed=0, limit=40)
    assert len(train) == 40 and set(train.labels.tolist()) == {0, 1, 2, 3} and set(val.labels.tolist()) == {0, 1, 2, 3}
    test = load_for(str(ordered_folder), pre, split="test", val_fraction=0.25, limit=8)
    assert len(test) == 8 and set(test.labels.tolist()) == {0, 1, 2, 3}


def test_compare_with_limit_trains_and_tests_every_entry_on_every_class(ordered_folder, tmp_path, one_thread):
    """The issue's case: compare --limit ranked transfer below a scratch CNN because the first N files
    of a class-ordered folder held 2 of 5 classes."""
    import imclass
    from imclass.evaluate.compare import compare

    board = compare(str(ordered_folder), "knn-l1,mlp", "30s", tmp_path / "cmp", limit=20, image_size=12,
                    max_epochs=1, log=None)
    assert board["train_images"] == 20 and board["test_images"] == 20
    knn = imclass.load(next(e for e in board["entries"] if e["name"] == "knn-l1")["model_file"])
    assert knn.classes_.tolist() == [0, 1, 2, 3]  # every class among its training images
    mlp_run = next(e for e in board["entries"] if e["name"] == "mlp")["run"]
    config = json.loads((tmp_path / "cmp" / "runs" / "mlp" / "config.json").read_text())
    assert config["limit"] == 20 and mlp_run


def test_evaluate_limit_reports_every_class(ordered_folder, tmp_path, one_thread):
    from typer.testing import CliRunner

    from imclass.cli import app

    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--model", "mlp", "--dataset", str(ordered_folder), "--image-size", "12",
                                   "--epochs", "1", "--out", str(run), "--json"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["evaluate", str(run), str(ordered_folder), "--limit", "8", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["images"] == 8 and set(report["per_class_accuracy"]) == {"a", "b", "c", "d"}
    assert all(v is not None for v in report["per_class_accuracy"].values())
