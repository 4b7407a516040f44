"""`imclass compare`: every approach on the same split within a time budget; a leaderboard; resumable."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from imclass.evaluate.compare import compare, leaderboard_table, parse_budget, parse_models


@pytest.fixture(scope="module")
def folder(tmp_path_factory, cifar_small):
    """A small CIFAR-10 image folder: train/ (200 images) and test/ (60 images), PNG (lossless)."""
    import imclass

    classes = imclass.data.CLASSES["cifar10"]
    root = tmp_path_factory.mktemp("cifar_folder")
    for split, images, labels in (("train", cifar_small[0][:200], cifar_small[1][:200]),
                                  ("test", cifar_small[2][:60], cifar_small[3][:60])):
        for i, (img, label) in enumerate(zip(images, labels.tolist())):
            (root / split / classes[label]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / split / classes[label] / f"{i}.png")
    return root


def test_budgets_and_approach_names_are_parsed_and_checked():
    assert parse_budget("10m") == 600 and parse_budget("90s") == 90 and parse_budget("90") == 90
    assert parse_budget("1h") == 3600 and parse_budget("1m30s") == 90 and parse_budget(2.5) == 2.5
    for bad in ("", "ten minutes", "0s", "-5"):
        with pytest.raises(ValueError, match="expected a time budget"):
            parse_budget(bad)
    assert parse_models("knn-l1, mlp,transfer:mobilenetv2_100") == ["knn-l1", "mlp", "transfer:mobilenetv2_100"]
    with pytest.raises(ValueError, match="unknown k-NN approach 'knn-l3'"):
        parse_models("knn-l3")
    with pytest.raises(ValueError, match="unknown approach 'alexnet9'"):
        parse_models("mlp,alexnet9")
    with pytest.raises(ValueError, match="each approach once"):
        parse_models("mlp,mlp")


def test_compare_ranks_approaches_and_resumes_keeping_finished_entries(folder, tmp_path, one_thread):
    import imclass
    from imclass.knn import KNN

    out = tmp_path / "cmp"
    logs: list[str] = []
    first = compare(str(folder), "knn-l1", "30s", out, log=logs.append)
    entry_file = out / "entries" / "knn-l1.json"
    kept_text, kept_mtime = entry_file.read_text(), entry_file.stat().st_mtime_ns
    train, test = imclass.data.load(folder, "train"), imclass.data.load(folder, "test")
    expected = KNN(k=1, metric="l1").fit(train.images, train.labels).score(test.images, test.labels)
    assert first["entries"][0]["accuracy"] == expected  # the same split for every approach

    # a comparison killed after its first entry, started again with one more approach
    (out / "runs" / "mlp").mkdir(parents=True)  # what a killed run leaves: a folder, no entry
    logs.clear()
    board = compare(str(folder), "knn-l1,mlp", "30s", out, max_epochs=2, log=logs.append)
    assert any(line.startswith("knn-l1: kept") for line in logs) and any(line == "mlp: training (budget 30 s)" for line in logs)
    assert entry_file.read_text() == kept_text and entry_file.stat().st_mtime_ns == kept_mtime  # not retrained
    by_name = {e["name"]: e for e in board["entries"]}
    assert set(by_name) == {"knn-l1", "mlp"}
    assert [e["accuracy"] for e in board["entries"]] == sorted((e["accuracy"] for e in board["entries"]), reverse=True)
    mlp = by_name["mlp"]
    assert mlp["epochs"] == 2 and mlp["planned_epochs"] == 2 and not mlp["stopped_by_budget"]
    assert mlp["parameters"] == sum(p.numel() for p in imclass.load(mlp["model_file"]).model.parameters())
    assert imclass.load(mlp["run"]).evaluate(test)["accuracy"] == pytest.approx(mlp["accuracy"], abs=1e-12)
    assert by_name["knn-l1"]["parameters"] == 0 and by_name["knn-l1"]["stored_values"] == 200 * 3 * 32 * 32
    assert mlp["images_per_second"] > 0 and by_name["knn-l1"]["images_per_second"] > 0
    assert json.loads((out / "leaderboard.json").read_text()) == board
    assert (out / "leaderboard.md").read_text().strip() == leaderboard_table(board)
    assert (out / "accuracy_vs_time.png").stat().st_size > 5_000

    # other settings: the entry is trained again, not reused
    logs.clear()
    compare(str(folder), "knn-l1", "20s", out, log=logs.append)
    assert "other settings" in logs[0] and entry_file.read_text() != kept_text


def test_budget_stops_training_through_the_engine(folder, tmp_path, one_thread):
    board = compare(str(folder), "mlp", 0.05, tmp_path / "cmp", max_epochs=500, log=None)
    entry = board["entries"][0]
    assert entry["stopped_by_budget"] and entry["epochs"] < 500


def test_cli_compare_prints_the_leaderboard_and_errors_plainly(folder, tmp_path, one_thread):
    from typer.testing import CliRunner

    from imclass.cli import app

    res = CliRunner().invoke(app, ["compare", str(folder), "--models", "knn-l2", "--budget", "1m", "--out",
                                   str(tmp_path / "c"), "--json"])
    assert res.exit_code == 0, res.output
    board = json.loads(res.stdout.strip().splitlines()[-1])
    assert board["budget_seconds"] == 60 and board["entries"][0]["name"] == "knn-l2"
    bad = CliRunner().invoke(app, ["compare", str(folder), "--models", "knn-l1", "--budget", "soon", "--out",
                                   str(tmp_path / "c")])
    assert bad.exit_code == 2 and "expected a time budget such as 10m" in bad.output and "Traceback" not in bad.output
