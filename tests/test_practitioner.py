"""The practitioner's path (issue 23): k-NN and `data show` on photo folders, data check naming what
train warns about, evaluate --mistakes, one spelling per flag."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imclass.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A plain tree of 3 classes x 20 'photos' of mixed sizes and formats (as a phone folder is)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    for c, name in enumerate(["cat", "dog", "owl"]):
        (root / name).mkdir()
        for i in range(20):
            h, w = 40 + 7 * (i % 5), 50 + 11 * (i % 3)
            pixels = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
            pixels[..., c] += 150  # each class its colour
            Image.fromarray(pixels).save(root / name / f"{i:02d}.{'jpg' if i % 2 else 'png'}")
    return root


def test_knn_on_a_folder_of_mixed_size_photos(photos):
    res = runner.invoke(app, ["knn", "--dataset", str(photos), "--image-size", "16", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["n_train"] + out["n_test"] == 60 and out["accuracy"] == 1.0  # colour alone separates the classes
    default = runner.invoke(app, ["knn", "--dataset", str(photos), "--json"])  # the folder default: 32 x 32
    assert default.exit_code == 0, default.output


def test_data_show_on_a_folder_of_mixed_size_photos(photos, tmp_path):
    out = tmp_path / "grid.png"
    res = runner.invoke(app, ["data", "show", str(photos), "--out", str(out), "--per-class", "4"])
    assert res.exit_code == 0, res.output
    assert "3 classes x up to 4 images" in res.stdout
    with Image.open(out) as im:
        assert im.height >= 3 * 64  # three rows of 64-pixel images


def test_data_check_names_every_pair_that_train_warns_about(tmp_path):
    """A plain tree: train warns about a leaked test image and a picture with two labels; data check
    must name both pairs (it used to mark every pair `splits: all`)."""
    import shutil
    import warnings

    import imclass
    from imclass.data.check import check_folder, format_report, quick_check

    rng = np.random.default_rng(2)
    root = tmp_path / "plain"
    for name in ("ant", "bee", "cat"):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    shutil.copy(root / "ant" / "0.png", root / "bee" / "99.png")  # one picture, two labels
    train, test = imclass.data.load(root, "train"), imclass.data.load(root, "test")
    held = sorted(set(imclass.data.load(root, "all").images.flatten(1).sum(1).tolist())
                  - set(train.images.flatten(1).sum(1).tolist()))
    assert len(test) == 6 and held  # 20 % of each class held out
    # leak: overwrite one held-out cat file with a training cat file (counts and split unchanged)
    cat_files = sorted((root / "cat").glob("*.png"))
    sums = {f: int(np.asarray(Image.open(f)).astype(np.int64).sum()) for f in cat_files}
    test_sums = set(test.images.flatten(1).sum(1).tolist())
    leaked_file = next(f for f in cat_files if sums[f] in test_sums)
    source_file = next(f for f in cat_files if sums[f] not in test_sums)
    shutil.copy(source_file, leaked_file)
    train, test = imclass.data.load(root, "train"), imclass.data.load(root, "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        messages = quick_check(train, test, name="plain")
    assert any("1 pair(s) of (near) identical training images of plain carry different labels" in m and
               "imclass data check" in m for m in messages)
    assert any("1 of the 6 test images of plain are (near) identical to training images" in m for m in messages)

    report = check_folder(root)
    exact = {tuple(g["files"]): g for g in report["exact_duplicates"]}
    conflict = exact[("ant/0.png", "bee/99.png")]
    assert conflict["labels_differ"] and conflict["kind"] == "across classes"
    leak = next(g for g in report["exact_duplicates"] if set(g["files"]) == {f"cat/{source_file.name}", f"cat/{leaked_file.name}"})
    assert leak["kind"] == "across splits" and sorted(leak["splits"]) == ["test", "train"]
    text = format_report(report)
    assert "1 across splits" in text and f"cat/{leaked_file.name} (test)" in text and "ant/0.png (train)" in text


def test_a_run_folder_holds_best_and_last_curves_and_confusion_and_is_never_overwritten(photos, tmp_path, one_thread):
    import csv

    import imclass
    from imclass.io import read_metadata

    out = tmp_path / "run"
    args = ["train", "--model", "mlp", "--dataset", str(photos), "--image-size", "16", "--epochs", "4",
            "--val-fraction", "0.25", "--lr", "0.01", "--out", str(out), "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout.strip().splitlines()[-1])
    for name in ("history.csv", "curves.png", "confusion_matrix.png", "best.safetensors", "last.safetensors",
                 "model.safetensors", "config.json"):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "history.csv").open()))
    val = [float(r["val_accuracy"]) for r in rows]
    best = read_metadata(out / "best.safetensors")["metrics"]
    assert best["val_accuracy"] == max(val) and best["epoch"] == val.index(max(val)) + 1  # best by validation
    assert read_metadata(out / "last.safetensors")["metrics"]["epoch"] == 4
    assert (out / "model.safetensors").read_bytes() == (out / "best.safetensors").read_bytes()
    test = imclass.data.load(photos, "test", image_size=16)
    assert imclass.load(out).evaluate(test)["accuracy"] == pytest.approx(result["accuracy"])
    assert best["test_accuracy"] == pytest.approx(result["accuracy"])  # what /models and the page show
    # the same --out again: a new folder, the first run untouched
    before = (out / "model.safetensors").read_bytes()
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout.strip().splitlines()[-1])["out"] == str(tmp_path / "run-2")
    assert "holds an earlier run" in second.stderr and (out / "model.safetensors").read_bytes() == before
    # --exist-ok writes into it; --resume continues it in place
    third = runner.invoke(app, args[:-1] + ["--exist-ok", "--epochs", "1", "--json"])
    assert json.loads(third.stdout.strip().splitlines()[-1])["out"] == str(out)
    resumed = runner.invoke(app, ["train", "--out", str(out), "--resume", "--epochs", "2", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["out"] == str(out)


def test_train_help_is_grouped_in_panels_with_the_real_defaults():
    from imclass.transfer.workflow import TransferConfig
    from imclass.workflows.training import DEFAULT_EPOCHS, RunConfig

    res = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    text = res.stdout
    for panel in ("Data", "Model", "Recipe", "Transfer (a folder of photos)", "Output"):
        assert f"─ {panel} ─" in text, panel
    from imclass.workflows.recipes import fast_config

    fast = fast_config(90)
    text = " ".join(text.replace("│", " ").split())  # the panel's wrapped lines as one line
    assert f"default {DEFAULT_EPOCHS}; the fast recipe: {fast.epochs:g} for --target 90; transfer: fine-tuning epochs " \
           f"after --freeze-epochs, default {TransferConfig(dataset='.').epochs}" in text
    assert f"(default {RunConfig().augment}; a folder without pretrained weights: crop_flip; the fast recipe: its own " \
           f"flip + {fast.translate}-pixel translate)" in text
    assert "--from-model" in text and "The backbone's weights" in text


def test_one_meaning_per_flag_old_spellings_still_work(photos, tmp_path, one_thread):
    """--weights is backbone weights only: a model file is --from-model (old spelling kept, with a note);
    knn's vote weighting is --vote (--weights kept hidden); -m is --model, -k is k-NN's k."""
    run = tmp_path / "base"
    base = ["--dataset", str(photos), "--image-size", "16", "--epochs", "1", "--json"]
    assert runner.invoke(app, ["train", "-m", "mlp", *base, "--out", str(run)]).exit_code == 0
    new = runner.invoke(app, ["train", "--from-model", str(run), *base, "--out", str(tmp_path / "ft")])
    assert new.exit_code == 0, new.output
    old = runner.invoke(app, ["train", "--weights", str(run), *base, "--out", str(tmp_path / "ft-old")])
    assert old.exit_code == 0, old.output
    assert "names a model file: that is --from-model now" in old.stderr
    assert json.loads(old.stdout.strip().splitlines()[-1])["model"] == "mlp"

    voted = runner.invoke(app, ["knn", "--dataset", str(photos), "--image-size", "16", "--vote", "distance", "-k", "3",
                                "--json"])
    legacy = runner.invoke(app, ["knn", "--dataset", str(photos), "--image-size", "16", "--weights", "distance",
                                 "-k", "3", "--json"])
    assert voted.exit_code == legacy.exit_code == 0, voted.output + legacy.output
    a, b = (json.loads(r.stdout.strip().splitlines()[-1]) for r in (voted, legacy))
    assert a["weights"] == b["weights"] == "distance" and a["k"] == 3 and a["accuracy"] == b["accuracy"]
    helps = {cmd: runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"}).stdout for cmd in ("knn", "tune", "predict")}
    assert "--vote" in helps["knn"] and "--weights" not in helps["knn"] and " -m " not in helps["knn"]
    assert "--search" in helps["tune"] and "--sampler " not in helps["tune"]  # named only in the note
    assert "-k" not in helps["predict"].split("--top")[1].split("\n")[0]  # --top is -t


def test_evaluate_mistakes_csv_names_every_misclassified_file(photos, tmp_path, one_thread):
    import csv
    import math

    import torch

    import imclass

    run = tmp_path / "weak"
    res = runner.invoke(app, ["train", "-m", "mlp", "--dataset", str(photos), "--image-size", "16", "--epochs", "1",
                              "--lr", "1e-5", "--out", str(run), "--json"])  # barely trained: mistakes to list
    assert res.exit_code == 0, res.output
    table = tmp_path / "mistakes.csv"
    out = runner.invoke(app, ["evaluate", str(run), str(photos), "--mistakes", str(table), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout.strip().splitlines()[-1])
    rows = list(csv.DictReader(table.open()))
    assert list(rows[0]) == ["path", "given", "predicted", "probability", "loss"] if rows else True
    assert len(rows) == report["mistakes"] == round((1 - report["accuracy"]) * report["images"])
    clf = imclass.load(run)
    test = imclass.data.load(photos, "test", image_size=16)
    probs = clf.predict_proba(test.images)
    by_path = {p: i for i, p in enumerate(test.paths)}
    for r in rows:
        i = by_path[r["path"]]  # a real file of the folder, relative to it
        assert (photos / r["path"]).is_file() and r["given"] == test.classes[int(test.labels[i])] != r["predicted"]
        assert float(r["loss"]) == pytest.approx(-math.log(float(probs[i, test.labels[i]])), abs=1e-4)
        assert float(r["probability"]) == pytest.approx(float(probs[i].max()), abs=1e-5)
    assert [float(r["loss"]) for r in rows] == sorted((float(r["loss"]) for r in rows), reverse=True)


def test_models_list_shows_plain_text_and_whole_first_paragraphs():
    res = runner.invoke(app, ["models"])
    assert res.exit_code == 0
    assert "``" not in res.stdout and ":func:" not in res.stdout
    line = next(l for l in res.stdout.splitlines() if l.startswith("transfer_net"))
    assert "without its classifier, then" in line and not line.rstrip().endswith("then")  # not cut mid-sentence


def test_report_captions_name_the_files_and_top5_is_left_out_for_few_classes(photos, tmp_path, one_thread):
    run = tmp_path / "weak"
    res = runner.invoke(app, ["train", "-m", "mlp", "--dataset", str(photos), "--image-size", "16", "--epochs", "1",
                              "--lr", "1e-5", "--out", str(run), "--json"])
    assert res.exit_code == 0, res.output
    out = runner.invoke(app, ["evaluate", str(run), str(photos), "--report", str(tmp_path / "rep"), "--json"])
    assert out.exit_code == 0, out.output
    numbers = json.loads((tmp_path / "rep" / "report.json").read_text())
    mistakes = numbers["examples"]["confident_mistakes"]
    assert mistakes and all((photos / m["path"]).is_file() and m["loss"] > 0 for m in mistakes)
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "top-3 accuracy" not in html and "top-5 accuracy" not in html  # 3 classes: always 100 %


def test_feature_extraction_says_what_it_does_off_a_terminal(capsys):
    """A silent ~20 s phase of `train --dataset FOLDER`: one line when it starts and one when it ends."""
    import torch
    from torch import nn

    from imclass.models.weights import Preprocessing
    from imclass.transfer.features import extract_features

    class Tiny(nn.Module):  # timm's contract, no weights
        def forward_features(self, x):
            return x

        def forward_head(self, x, pre_logits=False):
            return x.mean((2, 3))

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

    pre = Preprocessing(input_size=(3, 8, 8), resize=8, crop=8, mean=(0.5,) * 3, std=(0.5,) * 3)
    feats = extract_features(Tiny(), torch.zeros(300, 3, 8, 8, dtype=torch.uint8), pre, batch_size=64, amp=None)
    err = capsys.readouterr().err
    assert len(feats) == 300
    assert "extracting features: 300 images ..." in err and "extracting features: 300 images in " in err


def test_knn_neighbour_grid_queries_come_from_every_class(photos, tmp_path, monkeypatch):
    """A folder's test split is sorted by class: the grid's 10 queries are spread over it, not the first 10."""
    import imclass.knn

    drawn = {}
    monkeypatch.setattr(imclass.knn, "neighbour_grid", lambda model, queries, path, **kw: drawn.update(kw))
    res = runner.invoke(app, ["knn", str(photos), "--image-size", "16", "--neighbours-png", str(tmp_path / "nn.png")])
    assert res.exit_code == 0, res.output
    assert set(drawn["row_labels"]) == {"cat", "dog", "owl"} and len(drawn["row_labels"]) == 10
