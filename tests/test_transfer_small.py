"""Transfer learning that needs no downloaded weights: pretrain a small timm network on CIFAR-10 with
imclass, save it, load it through the weights-file path and transfer it to Fashion-MNIST with 20
images per class; it beats the same network started from random weights, same recipe and budget."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from imclass import models
from imclass.io import save
from imclass.models.weights import Preprocessing
from imclass.train import Classifier
from imclass.transfer import fine_tune, transfer
from imclass.transfer.finetune import resize_for

pytestmark = pytest.mark.usefixtures("one_thread")
ARCH = "timm:test_resnet"  # timm's 0.37 M-parameter ResNet for tests
SIZE = Preprocessing(input_size=(3, 32, 32), resize=32, crop=32)


@pytest.fixture(scope="module")
def pretrained(cifar_npz, tmp_path_factory):
    """2 epochs on 3,000 CIFAR-10 training images, saved as an imclass model file."""
    x = torch.from_numpy(cifar_npz["x_train"][:3000]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(cifar_npz["y_train"][:3000].astype(np.int64))
    torch.manual_seed(0)
    clf = Classifier(models.create(ARCH, num_classes=10), device="cpu").compile("adam", lr=2e-3)
    clf.fit((x, y), epochs=2, batch_size=64, seed=0, verbose=False)
    return save(clf, tmp_path_factory.mktemp("pretrained") / "cifar.safetensors"), clf


@pytest.fixture(scope="module")
def fashion(data_root):
    """20 training images per class and 500 test images of Fashion-MNIST, as 3 x 32 x 32 uint8."""
    from imclass.data import load

    train, test = load("fashion-mnist", "train", root=data_root), load("fashion-mnist", "test", root=data_root)
    rgb = lambda im: resize_for(im.expand(-1, 3, -1, -1).contiguous(), SIZE)  # grey 28x28 -> RGB 32x32
    idx = torch.cat([torch.nonzero(train.labels == c).flatten()[:20] for c in range(10)])
    return (rgb(train.images[idx]), train.labels[idx]), (rgb(test.images[:500]), test.labels[:500])


def _accuracy(weights, fashion, seed: int, preprocessing: Preprocessing | None = None) -> float:
    few, test = fashion
    torch.manual_seed(seed)
    model = transfer(ARCH, 10, weights=weights, head="linear", input_size=32)
    if preprocessing is not None:
        model.preprocessing = preprocessing
    result = fine_tune(model, few, epochs=0, freeze_epochs=30, seed=seed, amp=None)
    return result.classifier.evaluate(test)["accuracy"]


def test_the_weights_file_loads_with_its_preprocessing(pretrained):
    path, clf = pretrained
    model = transfer(ARCH, 10, weights=path, head="linear", input_size=32)
    report = model.load_report
    assert report.source == str(path) and report.ok and report.loaded
    assert report.dropped_head == ["fc.bias", "fc.weight"] or sorted(report.dropped_head) == ["fc.bias", "fc.weight"]
    state = clf.model.state_dict()
    assert all(torch.equal(model.backbone.state_dict()[k], state[k]) for k in report.loaded)
    assert model.preprocessing.mean == pytest.approx(tuple(clf.mean))  # recorded in the model file, carried over
    assert model.preprocessing.crop == 32


def test_pretrained_beats_random_initialisation(pretrained, fashion):
    path, clf = pretrained
    random_pre = Preprocessing(input_size=(3, 32, 32), resize=32, crop=32, mean=tuple(clf.mean), std=tuple(clf.std))
    for seed in (0, 1):
        with_weights = _accuracy(path, fashion, seed)
        from_scratch = _accuracy(None, fashion, seed, random_pre)
        assert with_weights > from_scratch + 0.1, (seed, with_weights, from_scratch)
        assert with_weights > 0.3  # chance is 0.1
