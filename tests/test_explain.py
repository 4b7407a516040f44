"""imclass.explain checked on models whose answer is known: Grad-CAM and occlusion mass where the
decision is made, saliency of a linear model = |its weights|, the filter grid shows a known kernel,
activations equal the layer's output, neighbours and t-SNE on separable data, the same-L2 copies,
and `imclass explain` from the command line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import imclass
from imclass import explain as ex

runner = CliRunner()


class RegionNet(nn.Module):
    """Sees only the top-left 8x8 of a 16x16 image: mask -> 1x1 conv -> ReLU -> mean -> 2 logits."""

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, 16, 16)
        mask[..., :8, :8] = 1
        self.register_buffer("mask", mask)
        self.conv = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight.fill_(0.5)
            self.conv.bias.zero_()  # nothing outside the region: activations there are 0
            self.head.weight.copy_(torch.tensor([[-1.0] * 4, [1.0] * 4]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.conv(x * self.mask))  # (N, 4, 16, 16), zero outside the region
        return self.head(a.mean((2, 3)))


def _inside_fraction(heat: torch.Tensor) -> float:
    heat = heat.abs()
    return float(heat[:8, :8].sum() / heat.sum())


@pytest.fixture(scope="module")
def region_clf():
    return imclass.Classifier(RegionNet(), classes=["left", "right"], mean=[0.5] * 3, std=[0.25] * 3, device="cpu")


@pytest.fixture(scope="module")
def image():
    g = torch.Generator().manual_seed(0)
    return torch.randint(140, 255, (3, 16, 16), dtype=torch.uint8, generator=g)


def test_gradcam_mass_lies_in_the_region_the_decision_depends_on(region_clf, image):
    e = ex.gradcam(region_clf, image, target="right")
    assert e.target == 1 and e.target_name == "right" and e.details["layer"] == "conv"
    assert e.heatmap.shape == (16, 16) and e.heatmap.sum() > 0
    assert _inside_fraction(e.heatmap) > 0.99
    assert e.probability == pytest.approx(float(region_clf.predict_proba(image[None])[0, 1]), abs=1e-6)


def test_occlusion_mass_lies_in_the_region_and_a_patch_outside_changes_nothing(region_clf, image):
    e = ex.occlusion(region_clf, image, target=1, window=4, stride=4)
    assert _inside_fraction(e.heatmap) > 0.999
    assert e.heatmap[8:, :].abs().max() < 1e-6 and e.heatmap[:, 8:].abs().max() < 1e-6
    # one window by hand: grey in the top-left 4x4 lowers P(right) by exactly its attribution
    x = image.float()[None] / 255
    grey = x.clone()
    grey[..., :4, :4] = 0.5
    drop = region_clf.predict_proba(x)[0, 1] - region_clf.predict_proba(grey)[0, 1]
    assert float(e.attribution[0, 0, 0]) == pytest.approx(float(drop), abs=1e-5)


def test_saliency_of_a_linear_model_equals_its_weights():
    torch.manual_seed(0)
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    img = torch.rand(3, 4, 4)
    e = ex.saliency(linear, img, target=2)  # a bare module: pixels go in as they are
    torch.testing.assert_close(e.attribution, linear[1].weight[2].detach().abs().view(3, 4, 4))
    std = [0.2, 0.4, 0.5]
    clf = imclass.Classifier(linear, mean=[0.5] * 3, std=std, device="cpu")
    e = ex.saliency(clf, img, target=0)  # through the normalisation: d logit / d pixel = w / std
    expected = linear[1].weight[0].detach().abs().view(3, 4, 4) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(e.attribution, expected)
    torch.testing.assert_close(e.heatmap, expected.amax(0))


def test_filter_grid_of_a_known_kernel_shows_that_kernel(tmp_path):
    conv_net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    kernel = torch.arange(27, dtype=torch.float32).view(3, 3, 3) - 5  # values -5..21
    with torch.no_grad():
        conv_net[0].weight[1] = kernel
    name, imgs = ex.filter_images(conv_net)
    assert name == "0" and imgs.shape == (4, 3, 3, 3)
    torch.testing.assert_close(imgs[1], (kernel + 5) / 26)
    summary = ex.save_filters(conv_net, tmp_path / "f.png", scale=5, cols=4)
    pixels = np.asarray(Image.open(tmp_path / "f.png").convert("RGB"))
    pad, s, k = 2, 5, 3
    left = pad + 1 * (k * s + pad)  # the second tile
    top = pixels.shape[0] - pad - k * s  # one row of tiles under the title
    tile = pixels[top : top + k * s : s, left : left + k * s : s]  # one pixel per kernel cell, (3, 3, RGB)
    expected = ((kernel + 5) / 26 * 255).round().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(tile, expected)
    assert summary["filters"] == 4 and summary["layer"] == "0"
    # the figure is titled: what layer, how many kernels of what size, how each is scaled (dark text above the grid)
    assert summary["title"] == "filters of 0: 4 kernels of 3x3 (RGB; each scaled to its own min..max)"
    assert top > 12 and (pixels[: top - pad] < 100).any()


def test_activations_of_a_named_layer_equal_its_output(region_clf, image, tmp_path):
    name, maps = ex.activations(region_clf, image, layer="conv")
    x = (image.float()[None] / 255 - 0.5) / 0.25
    expected = region_clf.model.conv(x * region_clf.model.mask)[0]
    torch.testing.assert_close(maps, expected)
    summary = ex.save_activations(region_clf, image, tmp_path / "a.png", layer="conv")
    assert summary["maps"] == 4 and summary["map_size"] == [16, 16] and (tmp_path / "a.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="unknown layer 'nope'; layers include: conv, head"):
        ex.activations(region_clf, image, layer="nope")
    with pytest.raises(ValueError, match=r"unknown class 'zebra'; this model's classes: left, right"):
        ex.gradcam(region_clf, image, target="zebra")
    with pytest.raises(ValueError, match=r"expected an image of shape \(3, 32, 32\)"):
        clf = imclass.Classifier(RegionNet(), mean=[0.5] * 3, std=[0.25] * 3, device="cpu")
        clf.input_size = (3, 32, 32)
        ex.gradcam(clf, image)


def _blobs(n_per: int = 20, seed: int = 0):
    """Three classes of 8x8 images: a red, a green and a blue field with noise (pixel-separable)."""
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for c in range(3):
        base = torch.full((n_per, 3, 8, 8), 40.0)
        base[:, c] = 200
        images.append((base + torch.randn(n_per, 3, 8, 8, generator=g) * 20).clamp(0, 255).to(torch.uint8))
        labels += [c] * n_per
    return torch.cat(images), torch.tensor(labels)


def test_knn_takes_occlusion_and_neighbours_but_not_gradients(tmp_path):
    x, y = _blobs()
    knn = imclass.KNN(k=3, backend="torch").fit(x, y)
    with pytest.raises(ValueError, match="Grad-CAM needs a neural network; a k-NN model has no layers"):
        ex.gradcam(knn, x[0])
    e = ex.occlusion(knn, x[0], window=4)
    assert e.target == 0 and e.heatmap.shape == (8, 8)
    r = ex.neighbours(knn, x[5], x, y, k=3, classes=["r", "g", "b"], out=tmp_path / "n.png")
    assert r["pixel"][0] == {"index": 5, "label": "r", "distance": 0.0}
    assert [n["index"] for n in r["pixel"]] == [n["index"] for n in r["feature"]]  # a k-NN's features are its pixels
    assert (tmp_path / "n.png").stat().st_size > 1000


def test_the_neighbours_picture_captions_the_query_with_its_true_and_predicted_class(tmp_path, monkeypatch):
    import imclass.explain.space as space

    drawn = {}
    monkeypatch.setattr(space, "save_captioned_grid", lambda imgs, caps, out, **kw: drawn.update(caps=caps, n=len(imgs)))
    x, y = _blobs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 3))
    clf = imclass.Classifier(model, classes=["r", "g", "b"], mean=[0.5] * 3, std=[0.25] * 3, device="cpu")
    r = ex.neighbours(clf, x[25], x, y, k=3, out=tmp_path / "n.png", true_class="g")
    assert r["predicted"] in {"r", "g", "b"} and drawn["n"] == 8
    assert drawn["caps"][0] == drawn["caps"][4] == f"g → {r['predicted']}"  # the query starts both rows
    assert drawn["caps"][1] == "g 0"  # the nearest in pixels is the image itself: its class and distance
    ex.neighbours(clf, x[25], x, y, k=3, out=tmp_path / "n.png")
    assert drawn["caps"][0] == f"query → {r['predicted']}"  # true class unknown (a file given as the query)


def test_neighbours_find_the_image_itself_in_both_spaces_and_tsne_separates_classes(tmp_path):
    x, y = _blobs()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 3))
    clf = imclass.Classifier(model, classes=["r", "g", "b"], mean=[0.5] * 3, std=[0.25] * 3, device="cpu")
    r = ex.neighbours(clf, x[33], x, y, k=4)
    assert r["pixel"][0]["index"] == 33 and r["pixel"][0]["distance"] == 0
    assert r["feature"][0]["index"] == 33 and r["feature"][0]["distance"] == pytest.approx(0, abs=1e-3)
    pix = x.flatten(1).float()
    order = (pix - pix[33]).norm(dim=1).argsort()[:4].tolist()
    assert [n["index"] for n in r["pixel"]] == order
    t = ex.tsne_map(clf, x, y, out=tmp_path / "t.png", perplexity=10, max_iter=250)
    assert np.asarray(t["coordinates"]).shape == (60, 2)
    assert t["neighbour_agreement"] >= 0.95  # chance is 1/3; 1.0 on AMD EPYC, 0.983 on the AMX Xeon (t-SNE numerics)
    assert (tmp_path / "t.png").stat().st_size > 5000


def test_same_l2_copies_are_equally_far_and_both_answers_are_reported(cifar_small, tmp_path):
    x, y, xt, _ = cifar_small
    clf = imclass.Classifier(imclass.models.create("fastnet", widths=(8, 16, 16), depth=1), mean=[0.5] * 3,
                             std=[0.25] * 3, device="cpu", classes=[str(i) for i in range(10)])
    r = ex.same_l2(x[3], x[:300], y[:300], clf, out=tmp_path / "s.png")
    copies = {row["copy"]: row for row in r["copies"]}
    assert set(copies) == {"original", "shifted", "occluded", "darkened"}
    for name in ("shifted", "occluded", "darkened"):
        assert copies[name]["l2"] == pytest.approx(r["l2"], rel=0.02), name
    assert copies["original"]["knn"] == str(int(y[3]))  # the image itself is in the training set: 1-NN returns it
    assert all("network" in row for row in r["copies"])
    assert r["knn_changes"] == sum(copies[n]["knn"] != copies["original"]["knn"] for n in ("shifted", "occluded", "darkened"))
    with pytest.raises(ValueError, match="flat"):
        ex.same_l2(torch.zeros(3, 8, 8, dtype=torch.uint8), x[:10], y[:10])


def test_cli_explain_writes_the_png_and_reports_errors(cifar_small, tmp_path):
    from imclass.cli import app

    x, y, xt, _ = cifar_small
    torch.manual_seed(0)
    clf = imclass.Classifier(imclass.models.create("fastnet", widths=(8, 16, 16), depth=1), mean=[0.5] * 3,
                             std=[0.25] * 3, device="cpu", classes=[f"c{i}" for i in range(10)])
    clf.input_size = (3, 32, 32)
    imclass.save(clf, tmp_path / "run")
    knn = imclass.KNN(k=1, backend="torch").fit(x[:100], y[:100])
    imclass.save(knn, tmp_path / "knn", classes=[f"c{i}" for i in range(10)], input_size=(3, 32, 32))
    photo = tmp_path / "photo.png"
    Image.fromarray(xt[0].permute(1, 2, 0).numpy()).save(photo)
    res = runner.invoke(app, ["explain", str(tmp_path / "run"), str(photo), "--method", "gradcam", "--target", "c3",
                              "--out", str(tmp_path / "g.png"), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["target_name"] == "c3" and Image.open(tmp_path / "g.png").size[0] > 300
    res = runner.invoke(app, ["explain", str(tmp_path / "run"), "--method", "filters", "--out", str(tmp_path / "f.png")])
    assert res.exit_code == 0 and (tmp_path / "f.png").is_file(), res.output
    res = runner.invoke(app, ["explain", str(tmp_path / "knn"), str(photo), "--method", "saliency", "--out", str(tmp_path / "k.png")])
    assert res.exit_code == 2 and "error: saliency needs a neural network" in res.output and not (tmp_path / "k.png").exists()
    res = runner.invoke(app, ["explain", str(tmp_path / "run"), str(photo), "--method", "magic", "--out", str(tmp_path / "m.png")])
    assert res.exit_code == 2 and "unknown method 'magic'" in res.output


def test_neighbours_says_it_is_computing_the_training_images_features(region_clf, image, capsys):
    """No silent phase: the features of 256+ training images (53 s on the flowers) have a progress line."""
    g = torch.Generator().manual_seed(1)
    train = torch.randint(0, 255, (300, 3, 16, 16), dtype=torch.uint8, generator=g)
    result = ex.neighbours(region_clf, image, train, torch.arange(300) % 2, k=3)
    assert len(result["feature"]) == 3
    err = capsys.readouterr().err  # not a terminal: a start and an end line
    assert "model features: 300 images ..." in err and "model features: 300 images in " in err
    ex.neighbours(region_clf, image, train[:100], torch.arange(100) % 2, k=3)
    assert "model features" not in capsys.readouterr().err  # a quick phase stays quiet
