"""The challenge transforms (imclass.data.challenge_transforms), robustness training and the challenge report."""
from __future__ import annotations

import json

import pytest

from conftest import evaluated_accuracy
import torch

from imclass.data import challenge_transforms as ch


@pytest.fixture(scope="module")
def images(cifar_small):
    return cifar_small[2][:64]  # 64 real CIFAR-10 test images, uint8 (N, C, H, W)


@pytest.mark.parametrize("name", ch.CHALLENGES)
def test_severity_zero_is_the_image_itself_and_draws_repeat_with_the_seed(name, images, one_thread):
    assert ch.apply_challenge(images, name, 0, seed=3) is images
    a = ch.apply_challenge(images, name, 3, seed=3)
    b = ch.apply_challenge(images, name, 3, seed=3)
    c = ch.apply_challenge(images, name, 3, seed=4)
    assert a.dtype == torch.uint8 and a.shape == images.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, images)


@pytest.mark.parametrize("name", ch.CHALLENGES)
def test_images_move_further_from_the_clean_ones_as_severity_grows(name, images, one_thread):
    dist = [(ch.apply_challenge(images, name, s, seed=0).float() - images.float()).abs().mean().item()
            for s in range(ch.MAX_SEVERITY + 1)]
    assert dist[0] == 0 and all(b > a for a, b in zip(dist, dist[1:])), dist


def test_brightness_gamma_and_contrast_are_monotone_where_measurable(images):
    dark = [ch.brightness(images, s).float().mean().item() for s in range(6)]
    bright = [ch.brightness(images, s, brighter=True).float().mean().item() for s in range(6)]
    gam = [ch.gamma(images, s).float().mean().item() for s in range(6)]
    spread = [ch.contrast(images, s).float().std().item() for s in range(6)]
    assert all(b < a for a, b in zip(dark, dark[1:]))
    assert all(b > a for a, b in zip(bright, bright[1:]))
    assert all(b < a for a, b in zip(gam, gam[1:]))
    assert all(b < a for a, b in zip(spread, spread[1:]))
    # brightness x(1 - 0.15 s) as torchvision computes it
    assert dark[4] == pytest.approx(images.float().mean().item() * 0.4, abs=0.6)


def test_occluded_fraction_grows_as_documented(images):
    grey = torch.zeros_like(images)  # a black image: every grey pixel is occluder
    h, w = images.shape[-2:]
    fracs = []
    for s in range(6):
        out = ch.occlusion(grey, s, torch.rand(len(grey), 2, generator=torch.Generator().manual_seed(0)))
        covered = (out == 128).all(1).float().mean((1, 2))  # (N,) fraction of pixels of each image
        assert torch.all(covered == covered[0])  # the square always lies fully inside the image
        fracs.append(covered[0].item())
        assert fracs[-1] == ch.occluder_side((h, w), s) ** 2 / (h * w)
    assert all(b > a for a, b in zip(fracs, fracs[1:]))
    assert fracs[5] == pytest.approx(0.35, abs=0.03)


def test_viewpoint_geometry_matches_torchvision(images):
    rot = ch.rotation(images, 2, sign=1)
    from torchvision.transforms.v2 import functional as TF

    expected = TF.rotate(images, 16.0, interpolation=TF.InterpolationMode.BILINEAR, fill=[128.0] * 3)
    assert (rot.int() - expected.int()).abs().max() <= 1
    zoomed = ch.scale(torch.full((1, 3, 32, 32), 200, dtype=torch.uint8), 5)  # zoom out: grey border appears
    assert zoomed[0, :, 0, 0].tolist() == [128, 128, 128] and zoomed[0, :, 16, 16].tolist() == [200, 200, 200]


def test_clutter_blends_with_the_documented_weight(images):
    bg = torch.zeros_like(images)
    out = ch.clutter(images, 4, bg)  # weight 0.4 of black: 0.6 of the image
    assert (out.float() - images.float() * 0.6).abs().max() <= 0.5 + 1e-4


def test_float_images_stay_float_and_agree_with_uint8(images):
    f = images.float() / 255
    for name in ch.CHALLENGES:
        out = ch.apply_challenge(f, name, 2, seed=1)
        assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
        ref = ch.apply_challenge(images, name, 2, seed=1).float() / 255
        assert (out - ref).abs().mean() < 0.01, name


def test_bad_input_names_the_problem(images):
    with pytest.raises(ValueError, match="expected a challenge in .*received 'fog'"):
        ch.apply_challenge(images, "fog", 1)
    with pytest.raises(ValueError, match="expected 0 <= severity <= 5, received severity=7"):
        ch.apply_challenge(images, "occlusion", 7)
    with pytest.raises(ValueError, match=r"expected a batch of images \(N, C, H, W\)"):
        ch.apply_challenge(images[0], "occlusion", 1)
    assert ch.parse_challenges("challenge") == ch.CHALLENGES
    assert ch.parse_challenges("illumination, occlusion") == ("illumination", "occlusion")
    with pytest.raises(ValueError, match="received 'blur'"):
        ch.parse_challenges("illumination,blur")


# ------------------------------------------------------------------------------ robustness training
MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 255 - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)


def test_challenge_augment_works_on_normalised_batches(images):
    x = _normalise(images[:16])
    g = torch.Generator().manual_seed(0)
    assert torch.allclose(ch.ChallengeAugment(mean=MEAN, std=STD, p=0.0)(x, g), x, atol=1e-5)  # no challenge: round trip
    occl = ch.ChallengeAugment(("occlusion",), max_severity=5, p=1.0, groups=1, mean=MEAN, std=STD)
    out = occl(x, torch.Generator().manual_seed(0))
    pixels = out * torch.tensor(STD).view(1, -1, 1, 1) + torch.tensor(MEAN).view(1, -1, 1, 1)
    grey = (pixels - 0.5).abs().amax(1) < 1e-5  # (N, H, W): the occluder, back on the pixel scale
    assert grey.float().mean((1, 2)).min() > 0  # every image got a grey square
    assert torch.equal(out, occl(x, torch.Generator().manual_seed(0)))  # seeded
    with pytest.raises(RuntimeError, match="needs the input normalisation"):
        ch.ChallengeAugment()(x, g)


def test_robust_training_goes_through_the_engine_and_repeats(cifar_small, one_thread):
    from imclass import models
    from imclass.train import Classifier

    x, y = cifar_small[0][:128], cifar_small[1][:128]

    def train() -> torch.Tensor:
        torch.manual_seed(0)
        clf = Classifier(models.create("mlp", num_classes=10, hidden=[16]), device="cpu").compile("adam", lr=1e-3)
        aug = ch.ChallengeAugment(("illumination", "occlusion"), p=1.0, base="flip")
        clf.fit((x, y), epochs=1, batch_size=64, augment=aug, callbacks=[aug], seed=1, verbose=False)
        assert aug.mean == clf.mean  # on_train_begin took the classifier's normalisation
        return torch.cat([p.detach().flatten() for p in clf.model.parameters()])

    assert torch.equal(train(), train())


def test_run_config_takes_challenge_augmentations(tmp_path, folder, one_thread):
    from imclass.workflows.training import RunConfig, split_augment, train_from_config

    assert split_augment("crop_flip,illumination,occlusion") == ("crop_flip", ("illumination", "occlusion"))
    assert split_augment("challenge") == (None, ch.CHALLENGES)
    with pytest.raises(ValueError, match="received 'fog'"):
        RunConfig(augment="crop_flip,fog")
    result = train_from_config(RunConfig(model="mlp", model_options={"hidden": [16]}, dataset=str(folder), epochs=1,
                                         augment="crop_flip,challenge", out=str(tmp_path / "run"), verbose=False))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["augment"] == "crop_flip,challenge"
    # the reported figure is the saved model's on the folder's 40 test images, recomputed independently
    assert result["accuracy"] == pytest.approx(evaluated_accuracy(tmp_path / "run", folder))
    assert result["accuracy"] * 40 == pytest.approx(round(result["accuracy"] * 40))


# ------------------------------------------------------------------------------ the report
def _write_tree(root, images, labels, classes):
    from PIL import Image

    for i, (img, label) in enumerate(zip(images, labels.tolist())):
        (root / classes[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / classes[label] / f"{i}.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, cifar_small):
    """A small CIFAR-10 image folder: train/ (200 images) and test/ (40 images), PNG (lossless)."""
    import imclass

    classes = imclass.data.CLASSES["cifar10"]
    root = tmp_path_factory.mktemp("cifar_folder")
    _write_tree(root / "train", cifar_small[0][:200], cifar_small[1][:200], classes)
    _write_tree(root / "test", cifar_small[2][:40], cifar_small[3][:40], classes)
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar_small):
    """Two saved models of two kinds: a 1-NN on raw pixels and a small FastNet (a zoo CNN)."""
    import imclass
    from imclass import models
    from imclass.train import Classifier

    classes = imclass.data.CLASSES["cifar10"]
    x, y = cifar_small[0][:256], cifar_small[1][:256]
    root = tmp_path_factory.mktemp("runs")
    imclass.save(imclass.KNN(k=1, metric="l1").fit(x, y), root / "knn", classes=classes)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    clf = Classifier(models.create("fastnet", num_classes=10, widths=(8, 16, 16), depth=1), classes=classes,
                     mean=MEAN, std=STD, device="cpu").compile("adam", lr=2e-3)
    clf.fit((x, y), epochs=1, batch_size=64, seed=0, verbose=False)
    torch.set_num_threads(threads)
    imclass.save(clf, root / "cnn")
    return root


@pytest.fixture(scope="module")
def cli_report(runs, folder, tmp_path_factory, cifar_small):
    """`imclass challenge knn cnn FOLDER --report DIR --limit 32 --shift FOLDER2 --json`, run once."""
    from typer.testing import CliRunner

    import imclass
    from imclass.cli import app

    shift = tmp_path_factory.mktemp("shift")  # a second test set: 24 other test images of three classes
    keep = [i for i in range(100, 200) if int(cifar_small[3][i]) in (3, 6, 8)][:24]  # cat, frog, ship
    _write_tree(shift, cifar_small[2][keep], cifar_small[3][keep], imclass.data.CLASSES["cifar10"])
    out = tmp_path_factory.mktemp("report")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    res = CliRunner().invoke(app, ["challenge", str(runs / "knn"), str(runs / "cnn"), str(folder), "--report", str(out),
                                   "--limit", "32", "--shift", str(shift), "--json"])
    torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1]), out, shift


def test_report_json_has_one_entry_per_challenge_with_severities_and_accuracies(cli_report):
    report, out, _ = cli_report
    assert list(report["challenges"]) == [*ch.CHALLENGES, "shift"]
    assert [m["name"] for m in report["models"]] == ["knn", "cnn"] and report["images"] == 32
    for name, entry in report["challenges"].items():
        sev = entry["severities"]
        assert sev == ([0, 1] if name == "shift" else [0, 1, 2, 3, 4, 5])
        assert len(entry["parameters"]) == len(sev)
        for model in ("knn", "cnn"):
            acc = entry["accuracy"][model]
            assert len(acc) == len(sev) and all(a * 32 == pytest.approx(round(a * 32)) for a in acc)  # k of 32 images
            assert acc[0] == report["clean_accuracy"][model]
        assert (out / entry["curve"]).stat().st_size > 0 and (out / entry["examples"]).stat().st_size > 0
    assert json.loads((out / "challenges.json").read_text()) == report


def test_severity_zero_is_the_clean_accuracy_that_evaluate_reports(cli_report, runs, folder):
    from typer.testing import CliRunner

    import imclass
    from imclass.cli import app

    report, _, _ = cli_report
    test = imclass.data.load(folder, split="test", limit=32)
    for model in ("knn", "cnn"):
        res = CliRunner().invoke(app, ["evaluate", str(runs / model), str(folder), "--limit", "32", "--json"])
        assert res.exit_code == 0, res.output
        evaluated = json.loads(res.stdout.strip().splitlines()[-1])["accuracy"]
        assert report["clean_accuracy"][model] == evaluated  # exactly
        predicted = imclass.load(runs / model).predict(test.images)
        assert report["clean_accuracy"][model] == (torch.as_tensor(predicted) == test.labels).double().mean().item()


def test_shift_entry_is_the_accuracy_on_the_second_test_set(cli_report, runs):
    import imclass

    report, _, shift = cli_report
    second = imclass.data.load(shift, split="all")  # classes cat, frog, ship: remapped to CIFAR-10 indices
    cifar = imclass.data.CLASSES["cifar10"]
    labels = torch.tensor([cifar.index(second.classes[int(v)]) for v in second.labels])
    knn = imclass.load(runs / "knn")
    expected = (knn.predict(second.images) == labels).double().mean().item()
    assert report["challenges"]["shift"]["accuracy"]["knn"] == [report["clean_accuracy"]["knn"], expected]
    assert report["challenges"]["shift"]["images"] == [32, len(second)] and len(second) == 24


def test_html_page_renders_offline_with_the_json_numbers(cli_report, chromium_page):
    from imclass.evaluate.challenge_report import pct

    report, out, _ = cli_report
    page = chromium_page
    page.goto((out / "challenges.html").as_uri())
    images = page.eval_on_selector_all("img", "els => els.map(i => [i.complete, i.naturalWidth, i.src.slice(0, 22)])")
    assert len(images) == 2 * len(report["challenges"])  # a curve and an example grid per challenge
    assert all(done and width > 0 and src == "data:image/png;base64," for done, width, src in images)
    cells = page.eval_on_selector_all(
        "td[data-model][data-challenge][data-severity]",
        "els => els.map(e => [e.dataset.model, e.dataset.challenge, +e.dataset.severity, e.innerText])")
    assert len(cells) == sum(2 * len(e["severities"]) for e in report["challenges"].values())
    for model, challenge, severity, text in cells:
        entry = report["challenges"][challenge]
        assert text == pct(entry["accuracy"][model][entry["severities"].index(severity)])
    summary = page.eval_on_selector_all("#summary td[data-model]",
                                        "els => els.map(e => [e.dataset.model, e.dataset.challenge, e.innerText])")
    assert len(summary) == 2 * (1 + len(report["challenges"]))
    assert all(text == pct(report["summary"][m][c]) for m, c, text in summary)
    page.screenshot(path=str(out / "screenshot.png"), full_page=True)
    assert (out / "screenshot.png").stat().st_size > 10_000 and page.console_errors == []


def test_cli_errors_name_the_problem(runs, tmp_path, folder, cifar_small):
    from typer.testing import CliRunner

    from imclass.cli import app

    def run(*args):
        res = CliRunner().invoke(app, ["challenge", *args, "--report", str(tmp_path / "report")])
        assert res.exit_code == 2 and "Traceback" not in res.output
        return res.output

    five = tmp_path / "five"  # a folder of 5 classes for a 10-class model
    _write_tree(five, cifar_small[2][:10], torch.arange(10) % 5, ["a", "b", "c", "d", "e"])
    assert "expected at least one RUN and then DATA" in run(str(folder))
    assert "received 'fog'" in run(str(runs / "knn"), str(folder), "--challenges", "fog")
    assert "no_such_run" in run(str(tmp_path / "no_such_run"), str(folder))
    assert "knows 10 classes but the data has 5" in run(str(runs / "knn"), str(five), "--split", "all")
