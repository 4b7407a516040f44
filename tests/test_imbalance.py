"""Class weights and the balanced sampler of ``Classifier.fit``: the weights against scikit-learn, the
sampler's draws, the errors, and minority-class recall on an artificially imbalanced CIFAR-10 subset."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from imclass import models
from imclass.data.loader import TensorLoader
from imclass.evaluate import per_class_accuracy
from imclass.train import Classifier
from imclass.train.imbalance import class_weights, parse_class_weight, sample_weights
from imclass.workflows.training import RunConfig, config_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ["automobile", "truck", "airplane"]  # CIFAR-10 labels 1, 9, 0; the airplanes are the minority


def _take(x, y, labels, counts):
    idx = np.concatenate([np.flatnonzero(y == c)[:n] for c, n in zip(labels, counts)])
    new = np.concatenate([[i] * n for i, n in enumerate(counts)])
    return torch.from_numpy(x[idx]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(new).long()


@pytest.fixture(scope="module")
def imbalanced(cifar_npz):
    """500 automobiles, 500 trucks, 25 airplanes to train on; 200 of each to test on (real CIFAR-10)."""
    train = _take(cifar_npz["x_train"], cifar_npz["y_train"], [1, 9, 0], [500, 500, 25])
    test = _take(cifar_npz["x_test"], cifar_npz["y_test"], [1, 9, 0], [200, 200, 200])
    return train, test


def _recall(train, test, seed, **fit_options) -> torch.Tensor:
    torch.manual_seed(seed)
    clf = Classifier(models.create("mlp", num_classes=3, hidden=[32]), classes=CLASSES, device="cpu")
    clf.compile("adam", lr=2e-3)
    clf.fit(train, epochs=3, batch_size=64, seed=seed, verbose=False, **fit_options)
    return per_class_accuracy(clf.predict(test[0]), test[1], 3)


def test_minority_recall_improves_with_weights_and_sampler(imbalanced):
    train, test = imbalanced
    gains = {"class_weight": [], "sampler": []}
    for seed in (0, 1):
        plain = _recall(train, test, seed)
        weighted = _recall(train, test, seed, class_weight="balanced")
        sampled = _recall(train, test, seed, sampler="balanced")
        assert weighted[2] > plain[2] + 0.1, (seed, plain, weighted)
        assert sampled[2] > plain[2] + 0.1, (seed, plain, sampled)
        gains["class_weight"].append(float(weighted[2] - plain[2]))
        gains["sampler"].append(float(sampled[2] - plain[2]))
    assert np.mean(gains["class_weight"]) > 0.2 and np.mean(gains["sampler"]) > 0.15, gains


def test_per_class_recall_matches_torchmetrics(imbalanced):
    from torchmetrics.functional.classification import multiclass_recall

    _, (x, y) = imbalanced
    pred = torch.randint(0, 3, (len(y),), generator=torch.Generator().manual_seed(0))
    expected = multiclass_recall(pred, y, num_classes=3, average=None)
    assert torch.allclose(per_class_accuracy(pred, y, 3).float(), expected.float())


def test_balanced_weights_are_sklearns():
    labels = torch.tensor([0] * 500 + [1] * 500 + [2] * 50)
    weights = class_weights("balanced", labels, CLASSES)
    assert torch.allclose(weights, torch.tensor([0.7, 0.7, 7.0]))  # n / (k * n_c) = 1050 / (3 * n_c)
    assert torch.equal(class_weights([1, 2, 3], labels, CLASSES), torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(class_weights({"airplane": 5, 0: 2}, labels, CLASSES), torch.tensor([2.0, 1.0, 5.0]))
    assert class_weights(None, labels, CLASSES) is None


@pytest.mark.parametrize("spec, message", [
    ("heavy", "expected class_weight 'balanced', a list or a dict, received 'heavy'"),
    ([1, 2], "expected class_weight with one weight per class (3), received 2"),
    ({"ship": 2}, "class_weight names an unknown class 'ship'"),
    ([1, 0, 1], "expected positive finite class weights, received [0.0]"),
])
def test_bad_class_weights_are_named(spec, message):
    with pytest.raises(ValueError) as err:
        class_weights(spec, torch.tensor([0, 1, 2]), CLASSES)
    assert message in str(err.value)


def test_balanced_needs_every_class():
    with pytest.raises(ValueError, match=r"needs training images of every class; none of \['airplane'\]"):
        class_weights("balanced", torch.tensor([0, 1, 1]), CLASSES)


def test_weighted_loss_is_torchs_weighted_cross_entropy():
    clf = Classifier(torch.nn.Linear(4, 3), classes=CLASSES, mean=[0.0], std=[1.0], device="cpu").compile()
    loss = clf._weighted_loss(torch.tensor([1.0, 2.0, 4.0]))
    logits, y = torch.randn(10, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 2, 1] * 2)
    w = torch.tensor([1.0, 2.0, 4.0])[y]
    by_hand = (w * F.cross_entropy(logits, y, reduction="none")).sum() / w.sum()
    assert torch.allclose(loss(logits, y), by_hand)
    custom = Classifier(torch.nn.Linear(4, 3), classes=CLASSES, mean=[0.0], std=[1.0], device="cpu")
    custom.compile(loss=lambda logits, y: F.cross_entropy(logits, y))
    with pytest.raises(ValueError, match="class_weight applies to the cross_entropy loss on class indices"):
        custom._weighted_loss(torch.ones(3))


def test_balanced_sampler_draws_classes_equally_and_repeatably():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    images = torch.zeros(1000, 1, 2, 2, dtype=torch.uint8)
    loader = TensorLoader(images, labels, 100, seed=3, sample_weights=sample_weights("balanced", labels))
    drawn = torch.cat([y for _, y in loader.batches(0)])
    assert len(drawn) == 1000 and len(loader) == 10
    share = torch.bincount(drawn, minlength=3) / 1000
    assert torch.all((share - 1 / 3).abs() < 0.06), share  # binomial sd of a share: 0.015
    assert torch.equal(loader.order(0), loader.order(0)) and not torch.equal(loader.order(0), loader.order(1))
    with pytest.raises(ValueError, match="expected sampler None or 'balanced', received sampler='even'"):
        sample_weights("even", labels)
    with pytest.raises(ValueError, match=r"expected sample_weights of shape \(1000,\)"):
        TensorLoader(images, labels, 100, sample_weights=torch.ones(5))


def test_run_config_and_cli_values():
    assert parse_class_weight("balanced") == "balanced" and parse_class_weight("none") is None
    assert parse_class_weight("1,5,1") == [1.0, 5.0, 1.0] and parse_class_weight('{"cat": 3}') == {"cat": 3}
    with pytest.raises(ValueError, match="expected --class-weight balanced, a list like 1,5,1 or JSON"):
        parse_class_weight("heavy")
    cfg = config_from_dict({"model": "mlp", "class_weight": "balanced", "sampler": "balanced"})
    assert (cfg.class_weight, cfg.sampler) == ("balanced", "balanced")
    with pytest.raises(ValueError, match="expected sampler 'balanced' or none, received 'even'"):
        RunConfig(model="mlp", sampler="even")


def test_train_cli_flags(tmp_path, data_root):
    import json

    from typer.testing import CliRunner

    from imclass.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--model", "mlp", "-o", "hidden=[16]", "--dataset", "mnist", "--data",
                                      str(data_root), "--limit", "128", "--epochs", "1", "--class-weight", "balanced",
                                      "--sampler", "balanced", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert (config["class_weight"], config["sampler"]) == ("balanced", "balanced")
    result = CliRunner().invoke(app, ["train", "--model", "mlp", "--dataset", "mnist", "--class-weight", "heavy"])
    assert result.exit_code == 2
    assert "error: expected --class-weight balanced, a list like 1,5,1 or JSON, received 'heavy'" in result.output
    result = CliRunner().invoke(app, ["train", "--model", "mlp", "--dataset", "mnist", "--data", str(data_root),
                                      "--limit", "64", "--class-weight", "1,2", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "expected class_weight with one weight per class (10), received 2" in result.output
