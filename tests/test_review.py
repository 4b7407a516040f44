"""Label review: confident learning against hand-computed cases, cross-validated probabilities, the CLI on
a real photo folder with planted errors, the page in a real browser, and apply / undo byte for byte."""
from __future__ import annotations

import hashlib
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from imclass.confident import calibrate, confident_joint, find_label_issues, label_quality, thresholds
from imclass.review.find import ReviewConfig, heldout_of_run, outlier_scores, outliers, review
from imclass.review.oof import cross_val_features, stratified_folds
from imclass.review.plan import apply_plan, destination_for, read_plan, undo_log, write_plan

# --------------------------------------------------------------------------------------------
# confident learning, by hand: 8 images, 3 classes; image 2 is labelled 0 but is a 1, image 7 is
# labelled 2 but is a 0, image 4 reaches no threshold.
P = np.array([[0.90, 0.05, 0.05], [0.70, 0.20, 0.10], [0.10, 0.80, 0.10],
              [0.10, 0.85, 0.05], [0.20, 0.70, 0.10],
              [0.05, 0.05, 0.90], [0.10, 0.10, 0.80], [0.60, 0.10, 0.30]])
S = np.array([0, 0, 0, 1, 1, 2, 2, 2])


def test_thresholds_are_the_average_self_confidence_per_class():
    assert thresholds(P, S) == pytest.approx([(0.9 + 0.7 + 0.1) / 3, (0.85 + 0.7) / 2, (0.9 + 0.8 + 0.3) / 3])


def test_confident_joint_counts_each_image_under_its_most_likely_confident_class():
    joint, guess = confident_joint(P, S)
    assert guess.tolist() == [0, 0, 1, 1, -1, 2, 2, 0]  # image 4: 0.7 < t_1 = 0.775, counted nowhere
    assert joint.tolist() == [[2, 1, 0], [0, 1, 0], [1, 0, 2]]
    q = calibrate(joint, S)  # rows rescaled to the label counts 3, 2, 3, then divided by their total 8
    assert q * 8 == pytest.approx(np.array([[2, 1, 0], [0, 2, 0], [1, 0, 2]], dtype=float))


@pytest.mark.parametrize("filter_by", ["prune_by_noise_rate", "prune_by_class", "both", "confident_joint"])
def test_every_filter_finds_the_two_planted_errors_ranked_by_self_confidence(filter_by):
    found = find_label_issues(P, S, filter_by=filter_by)
    assert found.indices.tolist() == [2, 7] and found.suggested.tolist() == [1, 0]
    assert found.quality == pytest.approx([0.1, 0.3]) and found.estimated_errors == 2


def test_normalised_margin_ranking_and_quality():
    assert label_quality(P, S, "normalized_margin")[[2, 7]] == pytest.approx([(0.1 - 0.8 + 1) / 2, (0.3 - 0.6 + 1) / 2])
    found = find_label_issues(P, S, rank_by="normalized_margin")
    assert found.indices.tolist() == [2, 7]


def test_clean_confident_probabilities_give_no_issue_and_bad_input_is_named():
    p = np.eye(3)[[0, 1, 2, 0, 1, 2]] * 0.9 + 0.1 / 3
    assert find_label_issues(p, np.array([0, 1, 2, 0, 1, 2])).indices.tolist() == []
    with pytest.raises(ValueError, match="expected labels in 0..2"):
        find_label_issues(p, np.array([0, 1, 2, 0, 1, 3]))
    with pytest.raises(ValueError, match="expected filter_by"):
        find_label_issues(p, np.array([0, 1, 2, 0, 1, 2]), filter_by="loss")


def test_stratified_folds_deal_every_class_evenly():
    labels = np.repeat([0, 1, 2], [10, 7, 4])
    fold = stratified_folds(labels, 3, seed=1)
    for c in range(3):
        counts = np.bincount(fold[labels == c], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert not np.array_equal(fold, stratified_folds(labels, 3, seed=2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cross_validated_logistic_regression_finds_flipped_labels_in_blobs(seed):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 16, generator=gen) * 3
    true = torch.arange(400) % 4
    x = centres[true] + torch.randn(400, 16, generator=gen)
    given = true.clone()
    flipped = torch.randperm(400, generator=gen)[:40]
    given[flipped] = (true[flipped] + 1 + torch.randint(0, 3, (40,), generator=gen)) % 4
    probs = cross_val_features(x, given, 4, folds=5, seed=seed)
    assert np.allclose(probs.sum(1), 1)
    ranked = np.argsort(label_quality(probs, given.numpy()), kind="stable")[:40]
    assert len(set(ranked.tolist()) & set(flipped.tolist())) >= 36  # precision at the true noise count >= 0.9
    found = find_label_issues(probs, given.numpy())
    assert len(set(found.indices.tolist()) & set(flipped.tolist())) >= 0.9 * len(found.indices)


# --------------------------------------------------------------------------------------------
# which images a run did not train on


def test_heldout_of_run_refuses_the_training_split_and_a_limit_sample(tmp_path):
    assert heldout_of_run({"dataset": "cifar10"}, "cifar10", None) == ("test", "the images the run held out of cifar10 (test)")
    with pytest.raises(ValueError, match="trained on the train split of cifar10.*not out of sample"):
        heldout_of_run({"dataset": "cifar10"}, "cifar10", "train")
    assert heldout_of_run({"dataset": "cifar10"}, "mnist", "train") == ("train", None)
    folder = tmp_path / "photos"
    folder.mkdir()
    with pytest.raises(ValueError, match="whole all split"):
        heldout_of_run({"dataset": str(folder)}, str(folder), "all")
    with pytest.raises(ValueError, match="--limit sample"):
        heldout_of_run({"dataset": str(folder), "limit": 100}, str(folder), None)


# --------------------------------------------------------------------------------------------
# plans, apply and undo


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _plan_row(root: Path, path: str, given: str, suggested: str, decision: str = "accept") -> dict:
    return {"root": str(root), "path": path, "given": given, "suggested": suggested,
            "destination": destination_for(path, given, suggested),
            "sha256": hashlib.sha256((root / path).read_bytes()).hexdigest(), "decision": decision}


def test_apply_moves_accepted_files_skips_changed_ones_never_overwrites_and_undo_restores(tmp_path):
    root = tmp_path / "photos"
    for c, names in {"cat": ["a.png", "b.png", "c.png"], "dog": ["b.png", "d.png"]}.items():
        (root / c).mkdir(parents=True)
        for n in names:
            (root / c / n).write_bytes(f"{c}/{n}".encode() * 10)
    before = _snapshot(root)
    rows = [_plan_row(root, "cat/a.png", "cat", "dog"), _plan_row(root, "cat/b.png", "cat", "dog"),
            _plan_row(root, "cat/c.png", "cat", "dog"), _plan_row(root, "dog/d.png", "dog", "cat", "reject")]
    plan = write_plan(tmp_path / "relabel.csv", rows)
    (root / "cat" / "c.png").write_bytes(b"edited after the review")
    before = _snapshot(root)
    outcome = apply_plan(plan)
    assert outcome.moved == [("cat/a.png", "dog/a.png"), ("cat/b.png", "dog/b-1.png")]  # dog/b.png was taken
    assert outcome.skipped == ["cat/c.png: changed since the review (its bytes differ); skipped"]
    after = _snapshot(root)
    assert sorted(after.values()) == sorted(before.values())  # nothing deleted, nothing overwritten
    assert after["dog/b-1.png"] == before["cat/b.png"] and after["dog/b.png"] == before["dog/b.png"]
    again = apply_plan(plan, log=tmp_path / "second.jsonl")  # applying twice moves nothing more
    assert again.moved == [] and len(again.skipped) == 3
    restored = undo_log(outcome.log)
    assert restored.moved == [("dog/b-1.png", "cat/b.png"), ("dog/a.png", "cat/a.png")]
    assert _snapshot(root) == before


def test_plan_errors_name_the_problem(tmp_path):
    bad = tmp_path / "plan.csv"
    bad.write_text("path,given\nx,y\n")
    with pytest.raises(ValueError, match="missing root, suggested, destination, sha256, decision"):
        read_plan(bad)
    bad.write_text("root,path,given,suggested,destination,sha256,decision\n/r,../x.png,a,b,b/x.png,0,accept\n")
    with pytest.raises(ValueError, match="line 2: expected a path inside the folder"):
        read_plan(bad)
    assert destination_for("train/roses/sub/x.jpg", "roses", "tulips") == "train/tulips/sub/x.jpg"
    with pytest.raises(ValueError, match="expected it under a 'daisy' class folder"):
        destination_for("roses/x.jpg", "daisy", "tulips")


# --------------------------------------------------------------------------------------------
# the command line on a real photo folder with planted errors; the page in a real browser


def _cli(*args: str):
    from imclass.cli import app

    return CliRunner().invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def reviewed(shared_weights, flowers_dir, tmp_path_factory):
    """3 flowers classes x 14 copied photos, 2 more daisies filed under roses/, a dandelion also filed
    under daisy/ (byte-identical); reviewed with 3 folds on MobileNetV2 features."""
    if not (shared_weights / "mobilenetv2_100-imagenet" / "model.safetensors").is_file():
        pytest.skip(f"no shared ImageNet weights under {shared_weights} (set IMCLASS_WEIGHTS)")
    if not flowers_dir.is_dir():
        pytest.skip(f"no flowers photos under {flowers_dir} (set IMCLASS_DATA)")
    tmp = tmp_path_factory.mktemp("review")
    root = tmp / "photos"
    for c in ("daisy", "dandelion", "roses"):
        (root / c).mkdir(parents=True)
        for src in sorted((flowers_dir / c).glob("*.jpg"))[:14]:
            shutil.copyfile(src, root / c / src.name)
    planted = [sorted((flowers_dir / "daisy").glob("*.jpg"))[20 + k] for k in range(2)]
    for src in planted:
        shutil.copyfile(src, root / "roses" / src.name)
    twin = sorted((flowers_dir / "dandelion").glob("*.jpg"))[0]
    shutil.copyfile(twin, root / "daisy" / ("copy-" + twin.name))
    out = tmp / "out"
    mp = pytest.MonkeyPatch()
    mp.setenv("IMCLASS_WEIGHTS", str(shared_weights))
    result = _cli("review", str(root), "--out", str(out), "--folds", "3", "--json", "--cache", str(tmp / "cache"))
    mp.undo()
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {"root": root, "out": out, "report": report, "planted": [f"roses/{p.name}" for p in planted],
            "twin": (f"dandelion/{twin.name}", f"daisy/copy-{twin.name}")}


def test_cli_review_of_a_folder_ranks_the_planted_errors_and_the_two_label_duplicate(reviewed):
    report = reviewed["report"]
    assert report["images"] == 45 and report["classes"] == ["daisy", "dandelion", "roses"] and report["seconds"] > 0
    issues = report["issues"]
    assert [i["score"] for i in issues] == sorted((i["score"] for i in issues), reverse=True)
    for issue in issues:
        assert set(issue) >= {"index", "path", "given", "suggested", "score", "kind"}
        assert issue["kind"] in ("label", "outlier", "duplicate") and 0 <= issue["score"] <= 1
    labels = [i for i in issues if i["kind"] == "label"]
    top = {i["path"]: i for i in labels[:6]}
    for path in reviewed["planted"]:  # the two daisies under roses/: found near the top, daisy suggested
        assert path in top and top[path]["given"] == "roses" and top[path]["suggested"] == "daisy"
    dups = {i["path"]: i for i in issues if i["kind"] == "duplicate"}
    a, b = reviewed["twin"]
    assert dups[a]["suggested"] == "daisy" and dups[b]["suggested"] == "dandelion" and dups[a]["score"] == 1.0
    saved = json.loads((reviewed["out"] / "review.json").read_text())
    assert [i["path"] for i in saved["issues"]] == [i["path"] for i in issues]


def test_offline_page_shows_large_thumbnails_and_filters_by_class_and_kind(reviewed, chromium_page):
    page = chromium_page
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto((reviewed["out"] / "index.html").as_uri())
    page.wait_for_selector("body[data-state=ready]", timeout=20_000)
    n = len(reviewed["report"]["issues"])
    assert page.locator(".card").count() == n
    sizes = page.eval_on_selector_all(".card img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert all(ok and max(w, h) >= 150 for ok, w, h in sizes)  # large enough to judge
    assert page.locator(".card button").count() == 0  # offline: no decisions
    page.select_option("#kind", "duplicate")
    assert page.locator(".card:not([hidden])").count() == sum(i["kind"] == "duplicate" for i in reviewed["report"]["issues"])
    page.select_option("#kind", "")
    page.select_option("#class", "roses")
    shown = page.eval_on_selector_all(".card:not([hidden])", "cs => cs.map(c => [c.dataset.given, c.dataset.suggested])")
    assert shown and all("roses" in pair for pair in shown)
    first = page.inner_text(".card .labels")
    assert "\u2192" in first
    assert all(u.startswith(("file:", "data:")) for u in requests)  # nothing from the network
    assert page.console_errors == []


def test_served_page_accept_two_reject_one_then_apply_and_undo_byte_for_byte(reviewed, chromium_page):
    import uvicorn

    from imclass.review.app import create_review_app

    root, out = reviewed["root"], reviewed["out"]
    before = _snapshot(root)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_review_app(out), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        page = chromium_page
        page.goto(f"http://127.0.0.1:{sock.getsockname()[1]}/")
        page.wait_for_selector("body[data-state=ready]", timeout=20_000)
        cards = page.locator(".card[data-kind=label]:has(button.accept)")
        paths = [cards.nth(k).locator(".path").inner_text() for k in range(3)]
        assert len(set(paths)) == 3
        cards.nth(0).locator("button.accept").click()
        page.wait_for_selector("body[data-saved='1']")
        cards.nth(1).locator("button.accept").click()
        page.wait_for_selector("body[data-saved='2']")
        cards.nth(2).locator("button.reject").click()
        page.wait_for_selector("body[data-saved='3']")
        assert "2 accepted, 1 rejected" in page.inner_text("#plan")
        assert page.console_errors == []
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    rows = read_plan(out / "relabel.csv")
    assert [r["decision"] for r in rows].count("accept") == 2 and [r["decision"] for r in rows].count("reject") == 1
    accepted = [r for r in rows if r["decision"] == "accept"]
    assert {r["path"] for r in rows} == set(paths)
    applied = _cli("review", "apply", str(out / "relabel.csv"), "--json")
    assert applied.exit_code == 0, applied.output
    outcome = json.loads(applied.stdout.strip().splitlines()[-1])
    assert sorted((m["from"], m["to"]) for m in outcome["moved"]) == sorted((r["path"], r["destination"]) for r in accepted)
    moved = _snapshot(root)
    assert sorted(moved.values()) == sorted(before.values())  # same bytes, nothing deleted
    for r in accepted:
        assert r["path"] not in moved and moved[r["destination"]] == before[r["path"]]
    undone = _cli("review", "undo", outcome["log"])
    assert undone.exit_code == 0, undone.output
    assert "moved 2 file(s) back, skipped 0" in undone.stdout
    assert _snapshot(root) == before


# --------------------------------------------------------------------------------------------
# named data sets: cross-validated fast recipe, and a run's held-out predictions


def test_cli_review_cifar10_cross_validated_and_with_a_run(tmp_path, data_root, cifar_npz):
    result = _cli("review", "cifar10", "--limit", "300", "--folds", "2", "--epochs", "1", "--widths", "8,16,16",
                  "--json", "--out", str(tmp_path / "cv"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["images"] == 300 and report["split"] == "train" and "fast recipe" in report["method"]
    classes = report["classes"]
    official = np.asarray(cifar_npz["y_train"]).reshape(-1)
    for issue in report["issues"]:  # index: the position in the official training split (--limit is a sample)
        assert issue["path"] is None and issue["given"] == classes[official[issue["index"]]]
        assert issue["kind"] in ("label", "duplicate", "outlier")
        assert issue["suggested"] in classes or (issue["kind"] == "outlier" and issue["suggested"] is None)
    assert (tmp_path / "cv" / "index.html").stat().st_size > 1000
    run = tmp_path / "run"
    trained = _cli("train", "--model", "mlp", "--dataset", "cifar10", "--limit", "256", "--epochs", "1", "--out", str(run))
    assert trained.exit_code == 0, trained.output
    refused = _cli("review", "cifar10", "--run", str(run), "--split", "train", "--out", str(tmp_path / "r"))
    assert refused.exit_code == 2 and "not out of sample" in refused.output
    scored = _cli("review", "cifar10", "--run", str(run), "--limit", "200", "--json", "--out", str(tmp_path / "r"))
    assert scored.exit_code == 0, scored.output
    report = json.loads(scored.stdout.strip().splitlines()[-1])
    assert report["split"] == "test" and report["images"] == 200 and str(run) in report["method"]


def test_outliers_measure_against_a_reference_and_take_the_z_score_within_each_feature_space():
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(40, 8, generator=gen)
    held = torch.cat([reference[:5] + 0.01 * torch.randn(5, 8, generator=gen), -reference[5:6]])  # last: opposite
    distance = outlier_scores(held, k=1, reference=reference)
    expected = 1 - torch.nn.functional.cosine_similarity(held[:, None], reference[None], dim=2).max(1).values
    np.testing.assert_allclose(distance, expected.double().numpy(), atol=1e-5)  # k=1: distance to the nearest
    # two feature spaces (folds) of different scales: within each, the planted image stands out; pooled,
    # it hides among the wide space's distances
    narrow = np.r_[np.linspace(0.10, 0.12, 20), 0.5]
    wide = np.linspace(1.0, 1.4, 20)
    far, share = outliers(np.r_[narrow, wide], 5.0, groups=np.r_[np.zeros(21), np.ones(20)])
    assert far.tolist() == [20] and share[20] == 1.0
    assert 20 not in outliers(np.r_[narrow, wide], 5.0)[0]  # one group: the z-score is pooled


def test_review_of_a_named_set_finds_outliers_in_each_folds_penultimate_features(data_root, cifar_npz):
    cfg = ReviewConfig("cifar10", limit=60, folds=2, outlier_k=5, outlier_z=1.0, data_root=str(data_root),
                       fast={"epochs": 1, "widths": [8, 16, 16]}, device="cpu")
    result = review(cfg)
    found = [r for r in result.issues if r["kind"] == "outlier"]
    assert found, "a z-score above 1 holds some of 60 images"
    official = np.asarray(cifar_npz["y_train"]).reshape(-1)
    for r in found:  # ranked by the share of images nearer their neighbours, official positions
        assert 0 < r["score"] <= 1 and r["distance"] > 0 and r["given"] == result.classes[official[r["index"]]]
    assert [r["score"] for r in found] == sorted((r["score"] for r in found), reverse=True)


def test_train_counts_suspected_label_errors_on_its_validation_split_as_review_with_the_run_does(reviewed, tmp_path,
                                                                                                 monkeypatch, shared_weights):
    monkeypatch.setenv("IMCLASS_WEIGHTS", str(shared_weights))
    root, run = reviewed["root"], tmp_path / "run"
    trained = _cli("train", "--dataset", str(root), "--image-size", "96", "--val-fraction", "0.5", "--json",
                   "--out", str(run))
    assert trained.exit_code == 0, trained.output
    report = json.loads(trained.stdout.strip().splitlines()[-1])
    assert report["val_images"] == 23 and isinstance(report["suspected_label_errors"], int)
    refused = _cli("review", str(root), "--run", str(run), "--split", "train", "--out", str(tmp_path / "r"))
    assert refused.exit_code == 2 and "not out of sample" in refused.output
    scored = _cli("review", str(root), "--run", str(run), "--json", "--out", str(tmp_path / "r"))
    assert scored.exit_code == 0, scored.output
    review = json.loads(scored.stdout.strip().splitlines()[-1])
    assert review["images"] == 23  # the same held-out half, scored by the same model
    assert review["counts"]["label"] == report["suspected_label_errors"]


def test_review_with_a_scratch_model_run_on_a_folder_reads_the_files_at_its_input_size(reviewed, tmp_path):
    """A run with no backbone (no crop in its preprocessing) is scored on the files resized to its input size."""
    root, run = reviewed["root"], tmp_path / "mlp"
    trained = _cli("train", "--model", "mlp", "--dataset", str(root), "--image-size", "24", "--epochs", "1",
                   "--json", "--out", str(run))
    assert trained.exit_code == 0, trained.output
    report = json.loads(trained.stdout.strip().splitlines()[-1])
    scored = _cli("review", str(root), "--run", str(run), "--json", "--out", str(tmp_path / "r"))
    assert scored.exit_code == 0, scored.output
    review = json.loads(scored.stdout.strip().splitlines()[-1])
    assert review["split"] == "test" and review["images"] == report["test_images"]
    assert all((root / issue["path"]).is_file() for issue in review["issues"])  # paths relative to the folder
