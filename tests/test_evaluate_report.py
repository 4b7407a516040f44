"""The evaluation report: its numbers against scikit-learn and torchmetrics on fixed predictions, ECE
against a hand-computed value, temperature scaling on a miscalibrated toy, the report of a Classifier
and of a k-NN, `imclass evaluate --report` against `--json`, and the page opened in headless Chromium."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from sklearn import metrics as skm
from typer.testing import CliRunner

import imclass
from imclass.evaluate import (
    classification_metrics,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
    report,
)

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
runner = CliRunner()


def _fixed(n: int = 300, c: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, c, (n,), generator=g)
    logits = torch.randn(n, c, generator=g) * 2
    logits[torch.arange(n), labels] += 1.5  # better than chance, not perfect
    return logits.softmax(1), labels


def test_metrics_equal_sklearn_and_torchmetrics_on_fixed_predictions():
    probs, labels = _fixed()
    names = [f"c{i}" for i in range(7)]
    m = classification_metrics(probs, labels, names)
    y, p = labels.numpy(), probs.argmax(1).numpy()
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, p), abs=1e-7)
    assert m["top5_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, probs.numpy(), k=5, labels=range(7)), abs=1e-7)
    prec, rec, f1, sup = skm.precision_recall_fscore_support(y, p, labels=range(7), zero_division=0)
    for i, name in enumerate(names):
        assert m["per_class"][name]["precision"] == pytest.approx(prec[i])
        assert m["per_class"][name]["recall"] == pytest.approx(rec[i])
        assert m["per_class"][name]["f1"] == pytest.approx(f1[i])
        assert m["per_class"][name]["support"] == sup[i]
    assert m["confusion_matrix"] == skm.confusion_matrix(y, p).tolist()
    np.testing.assert_allclose(m["confusion_matrix_normalised"], skm.confusion_matrix(y, p, normalize="true"))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, p, average="macro"))


def test_ece_equals_a_hand_computed_value_and_the_bins_add_up():
    probs = torch.tensor([[0.90, 0.05, 0.05],   # conf .90, correct     -> bin [.8, 1]
                          [0.85, 0.10, 0.05],   # conf .85, wrong       -> bin [.8, 1]
                          [0.50, 0.30, 0.20],   # conf .50, correct     -> bin [.4, .6)
                          [0.30, 0.36, 0.34]])  # conf .36, wrong       -> bin [.2, .4)
    labels = torch.tensor([0, 1, 0, 2])
    # ECE = sum over bins of n_b / N * |acc_b - conf_b| = (2 * |0.5 - 0.875| + |1 - 0.5| + |0 - 0.36|) / 4
    bins = reliability_bins(probs, labels, n_bins=5)
    assert bins["ece"] == pytest.approx((2 * 0.375 + 0.5 + 0.36) / 4, abs=1e-6)
    assert expected_calibration_error(probs, labels, 5) == pytest.approx(0.4025, abs=1e-6)
    assert bins["count"] == [0, 1, 1, 0, 2]
    assert bins["accuracy"][4] == 0.5 and bins["confidence"][4] == pytest.approx(0.875)
    assert bins["accuracy"][0] is None  # an empty bin has no accuracy
    with pytest.raises(ValueError, match="labels in 0..2"):
        reliability_bins(probs, torch.tensor([0, 1, 0, 3]))


def test_temperature_scaling_fixes_an_overconfident_toy():
    g = torch.Generator().manual_seed(1)
    true_logits = torch.randn(4000, 5, generator=g)
    labels = torch.multinomial(true_logits.softmax(1), 1, generator=g)[:, 0]  # labels drawn from the true probabilities
    overconfident = true_logits * 4.0
    t = fit_temperature(overconfident, labels)
    assert t == pytest.approx(4.0, rel=0.15)  # it recovers the scale that was applied
    assert nll(overconfident, labels, t) < nll(overconfident, labels) - 0.5
    before = expected_calibration_error(overconfident.softmax(1), labels)
    after = expected_calibration_error((overconfident / t).softmax(1), labels)
    assert after < before / 3
    with pytest.raises(ValueError, match="finite"):
        fit_temperature(torch.full((3, 2), float("nan")), torch.tensor([0, 1, 0]))


@pytest.fixture(scope="module")
def trained(cifar_small, tmp_path_factory, one_thread):
    """A tiny FastNet on 2,000 CIFAR-10 images (1 epoch, through Classifier.fit) saved as a run folder
    with a history.csv; a 3-NN saved beside it."""
    x, y, xt, yt = cifar_small
    root = tmp_path_factory.mktemp("report")
    torch.manual_seed(0)
    clf = imclass.Classifier(imclass.models.create("fastnet", widths=(8, 16, 16), depth=1), classes=CLASSES)
    clf.compile("adam", lr=3e-3)
    clf.fit((x, y), epochs=2, batch_size=128, verbose=False, seed=0)
    clf.input_size = (3, 32, 32)
    run = root / "run"
    imclass.save(clf, run)
    (run / "history.csv").write_text("epoch,loss,accuracy\n1,2.1,0.25\n2,1.8,0.34\n")
    knn = imclass.KNN(k=3, backend="torch").fit(x[:500], y[:500])
    imclass.save(knn, root / "knn", classes=CLASSES, input_size=(3, 32, 32))
    return {"root": root, "run": run, "clf": imclass.load(run), "knn": imclass.load(root / "knn"),
            "test": (xt[:200], yt[:200])}


def test_report_of_a_classifier_writes_html_pngs_and_json_matching_its_predictions(trained, tmp_path):
    out = tmp_path / "rep"
    xt, yt = trained["test"]
    r = report(trained["run"], (xt, yt), out, tta="none", progress=False)
    clf = trained["clf"]
    logits = clf.predict_logits(xt)
    pred = logits.argmax(1)
    assert r["accuracy"] == pytest.approx(clf.evaluate((xt, yt))["accuracy"], abs=1e-9)
    assert r["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, yt).item(), abs=1e-4)
    prec = skm.precision_score(yt.numpy(), pred.numpy(), labels=range(10), average=None, zero_division=0)
    assert [r["per_class"][c]["precision"] for c in CLASSES] == pytest.approx(prec.tolist())
    assert r["confusion_matrix"] == skm.confusion_matrix(yt.numpy(), pred.numpy(), labels=range(10)).tolist()
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["accuracy"] == r["accuracy"] and on_disk["ece"] == r["ece"]
    t = r["temperature"]
    assert t["temperature"] > 0 and "half" in t["fitted_on"] and t["measured_on_images"] == 100
    for name in ("confusion", "per_class", "reliability", "confident_mistakes", "unsure_correct", "training_curves"):
        assert (out / r["files"][name]).stat().st_size > 1000, name
    wrong = [e["confidence"] for e in r["examples"]["confident_mistakes"]]
    assert wrong == sorted(wrong, reverse=True) and all(e["true"] != e["predicted"] for e in r["examples"]["confident_mistakes"])
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 6 and "src=\"http" not in page


def test_report_fits_the_temperature_on_given_validation_data(trained, tmp_path):
    xt, yt = trained["test"]
    r = report(trained["clf"], (xt[:100], yt[:100]), tmp_path, val=(xt[100:], yt[100:]), tta="none", progress=False,
               n_examples=4)
    expected = fit_temperature(trained["clf"].predict_logits(xt[100:]), yt[100:])
    assert r["temperature"]["temperature"] == pytest.approx(expected, rel=1e-6)
    assert r["temperature"]["fitted_on"].startswith("validation data (100 images)")


def test_report_of_a_knn_uses_vote_shares_and_says_temperature_does_not_apply(trained, tmp_path):
    xt, yt = trained["test"]
    knn = trained["knn"]
    r = report(knn, (xt[:60], yt[:60]), tmp_path, classes=CLASSES, progress=False)
    assert r["accuracy"] == pytest.approx(knn.score(xt[:60], yt[:60]))
    assert r["temperature"]["temperature"] is None and "k-NN" in r["temperature"]["note"]
    assert r["loss"] is None
    with pytest.raises(ValueError, match="k-NN"):
        report(knn, (xt[:10], yt[:10]), tmp_path, tta="flip", progress=False)


def test_cli_evaluate_report_accuracy_equals_json(trained, tmp_path, data_root, monkeypatch):
    from imclass.cli import app

    monkeypatch.setenv("IMCLASS_DATA", str(data_root))
    args = ["evaluate", str(trained["run"]), "cifar10", "--limit", "150", "--json"]
    plain = runner.invoke(app, args)
    assert plain.exit_code == 0, plain.output
    with_report = runner.invoke(app, args + ["--report", str(tmp_path / "r")])
    assert with_report.exit_code == 0, with_report.output
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    expected = json.loads(plain.stdout.strip().splitlines()[-1])
    assert saved["accuracy"] == expected["accuracy"]
    assert {"confusion_matrix", "per_class", "ece"} <= set(saved)
    assert all({"precision", "recall"} <= set(v) for v in saved["per_class"].values())
    assert (tmp_path / "r" / "report.html").is_file()


def _lookup(numbers: dict, key: str):
    value = numbers
    for part in key.split("/"):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def test_report_page_in_headless_chromium_renders_and_shows_the_json_numbers(trained, chromium_page):
    out = trained["run"] / "report"
    xt, yt = trained["test"]
    r = report(trained["run"], (xt, yt), out, progress=False)
    page = chromium_page
    page.goto((out / "report.html").as_uri())
    page.wait_for_load_state("load")
    assert page.title().startswith("imclass evaluation report")
    sizes = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth])")
    assert len(sizes) == 6 and all(done and width > 0 for done, width in sizes)
    shown = page.eval_on_selector_all("[data-key]", "els => els.map(e => [e.dataset.key, e.textContent])")
    assert len(shown) > 100  # summary, per-class table and the whole confusion matrix
    for key, text in shown:
        value = _lookup(r, key)
        if isinstance(value, int):
            assert int(text.replace(",", "")) == value, key
        else:
            assert float(text) == pytest.approx(value, abs=5e-5), key
    assert re.search(r"accuracy", page.inner_text("#summary"))
    assert page.console_errors == []
    page.screenshot(path=str(out / "report.png"), full_page=True)
    assert (out / "report.png").stat().st_size > 10_000
