"""`imclass predict RUN PATH...`: files and folders (recursively), table / JSON / CSV output, batched,
unreadable files reported per file and counted in the exit status while the others are classified."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import imclass
from imclass.cli import app
from imclass.serve.predictor import Predictor, decode_image, find_images

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, cifar_npz, one_thread):
    """A tiny FastNet and a 3-NN on CIFAR-10, and a folder tree of 12 real test images (PNG and JPEG)
    with a corrupt file, a text file and a hidden folder in it."""
    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    clf = imclass.Classifier(imclass.models.create("fastnet", widths=(8, 16, 16), depth=1), classes=CLASSES,
                             mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])
    clf.input_size = (3, 32, 32)
    imclass.save(clf, root / "fast")
    x = torch.from_numpy(cifar_npz["x_train"][:300]).permute(0, 3, 1, 2).contiguous()
    knn = imclass.KNN(k=3).fit(x, torch.from_numpy(cifar_npz["y_train"][:300].astype(np.int64)))
    imclass.save(knn, root / "knn", classes=CLASSES)
    images = root / "images"
    paths = []
    for i in range(12):
        folder = images / ("a" if i < 5 else "b/deeper")
        folder.mkdir(parents=True, exist_ok=True)
        paths.append(folder / f"img{i:02d}.png")
        Image.fromarray(cifar_npz["x_test"][i]).save(paths[-1])
    (images / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (images / "notes.txt").write_text("not an image, not listed")
    (images / ".hidden").mkdir()
    Image.fromarray(cifar_npz["x_test"][20]).save(images / ".hidden" / "skip.png")
    tensor = torch.from_numpy(cifar_npz["x_test"][:12]).permute(0, 3, 1, 2).contiguous()
    return {"root": root, "images": images, "paths": paths, "clf": imclass.load(root / "fast"),
            "knn": imclass.load(root / "knn"), "tensor": tensor}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_find_images_walks_folders_sorted_and_keeps_files(setup):
    found = find_images([setup["images"], setup["paths"][0], setup["root"] / "absent.png"])
    expected = sorted(setup["paths"][:5]) + [setup["images"] / "b" / "broken.png"] + sorted(setup["paths"][5:])
    assert found == expected + [setup["paths"][0], setup["root"] / "absent.png"]


def test_a_folder_is_classified_recursively_and_bad_files_are_reported(setup):
    result = invoke("predict", setup["root"] / "fast", setup["images"], setup["root"] / "absent.png",
                    "--json", "-k", "10", "--batch-size", "5")
    assert result.exit_code == 1  # two files failed; the twelve others are still predicted
    report = json.loads(result.stdout)
    by_path = {p["image"]: p for p in report["predictions"]}
    assert set(by_path) == {str(p) for p in setup["paths"]}
    probs = setup["clf"].predict_proba(setup["tensor"])
    for i, path in enumerate(setup["paths"]):
        got = {t["class"]: t["probability"] for t in by_path[str(path)]["top"]}
        assert [got[c] for c in CLASSES] == pytest.approx(probs[i].tolist(), abs=1e-5)
    errors = {e["image"]: e["error"] for e in report["errors"]}
    assert set(errors) == {str(setup["images"] / "b" / "broken.png"), str(setup["root"] / "absent.png")}
    assert "not a readable image" in errors[str(setup["images"] / "b" / "broken.png")]
    assert "no such image file" in errors[str(setup["root"] / "absent.png")]


def test_table_and_csv_output_one_row_per_file(setup):
    table = invoke("predict", setup["root"] / "knn", setup["images"] / "a", "-k", "2")
    assert table.exit_code == 0, table.output
    lines = table.stdout.strip().splitlines()
    assert lines[0].split() == ["image", "top-1", "top-2"] and len(lines) == 6
    votes = setup["knn"].predict_proba(setup["tensor"][:5])
    top = votes.topk(1, dim=1).indices[:, 0]
    for line, path, c in zip(lines[1:], sorted(setup["paths"][:5]), top.tolist()):
        assert line.startswith(str(path)) and line.split()[1] == CLASSES[c]
    result = invoke("predict", setup["root"] / "knn", setup["images"], "--format", "csv", "-k", "3")
    assert result.exit_code == 1
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 13 and list(rows[0]) == ["image", "class_1", "probability_1", "class_2", "probability_2",
                                                  "class_3", "probability_3", "error"]
    broken = [r for r in rows if r["error"]]
    assert len(broken) == 1 and broken[0]["image"].endswith("broken.png") and broken[0]["class_1"] == ""
    good = {r["image"]: r for r in rows if not r["error"]}
    for i, path in enumerate(setup["paths"][:5]):
        assert float(good[str(path)]["probability_1"]) == pytest.approx(float(votes[i].max()), abs=1e-6)
    assert "1 of 13 image(s) could not be read" in result.stderr


def test_json_flag_is_an_alias_and_bad_options_are_one_line_errors(setup):
    a = invoke("predict", setup["root"] / "fast", setup["paths"][0], "--json")
    b = invoke("predict", setup["root"] / "fast", setup["paths"][0], "--format", "json")
    assert a.exit_code == b.exit_code == 0 and json.loads(a.stdout) == json.loads(b.stdout)
    for args, message in [
        (["--format", "xml"], "expected --format in ['table', 'json', 'csv'], received --format xml"),
        (["--json", "--format", "csv"], "--json means --format json"),
        (["--top", "0"], "expected --top >= 1"),
    ]:
        result = invoke("predict", setup["root"] / "fast", setup["paths"][0], *args)
        assert result.exit_code == 2 and result.stderr.startswith("error: ") and message in result.stderr
    empty = setup["root"] / "empty"
    empty.mkdir()
    result = invoke("predict", setup["root"] / "fast", empty)
    assert result.exit_code == 2 and "no image files found in" in result.stderr


def test_decode_resizes_like_training_and_refuses_bombs_before_decoding(setup, tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.asarray(Image.open(setup["paths"][0]).resize((64, 48)))).save(big)
    p = Predictor.load(setup["root"] / "fast")
    resized = np.array(Image.open(big).convert("RGB").resize((32, 32), Image.BILINEAR))
    assert torch.equal(p.decode(big), torch.from_numpy(resized).permute(2, 0, 1))
    # resize + centre crop (an ImageNet-style evaluation), through torchvision transforms.v2
    cropped = decode_image(big.read_bytes(), resize=40, crop=32)
    assert cropped.shape == (3, 32, 32)
    with pytest.raises(ValueError, match=r"3,072 pixels exceeds the limit of 1,000"):
        decode_image(big.read_bytes(), max_pixels=1000)
    with pytest.raises(ValueError, match="not a readable image") as err:
        decode_image(b"GIF89a nonsense")
    assert err.value.status == 415


def test_a_bare_module_and_a_pretrained_style_resize_crop_are_predicted_as_recorded(setup, tmp_path):
    from imclass.models.weights import Preprocessing
    from imclass.transfer.features import prepare_batch

    # a bare nn.Module file: its input is scaled to [0, 1], softmax of its logits
    torch.manual_seed(1)
    bare = imclass.models.create("fastnet", widths=(8, 16, 16), depth=1).eval()
    imclass.save(bare, tmp_path / "bare.safetensors", classes=CLASSES, input_size=(3, 32, 32))
    p = Predictor.load(tmp_path / "bare.safetensors")
    assert p.kind == "model" and p.classes == CLASSES
    with torch.no_grad():
        expected = bare(setup["tensor"][:4].float() / 255).softmax(1)
    torch.testing.assert_close(p.predict_proba(setup["tensor"][:4]), expected, atol=1e-5, rtol=0)

    # a backbone's preprocessing (shorter side 40, centre crop 32) recorded in the file is what decode does,
    # and the probabilities equal those of the transfer pipeline's own prepare_batch on the full image
    pre = Preprocessing(input_size=(3, 32, 32), resize=40, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    clf = imclass.Classifier(bare, classes=CLASSES, mean=list(pre.mean), std=list(pre.std))
    clf.input_size, clf.preprocessing = (3, 32, 32), pre
    imclass.save(clf, tmp_path / "backbone")
    p = Predictor.load(tmp_path / "backbone")
    assert (p.preprocessing["resize"], p.preprocessing["crop"]) == (40, 32)
    photo = tmp_path / "photo.png"
    full = np.array(Image.open(setup["paths"][3]).resize((80, 60), Image.BICUBIC))
    Image.fromarray(full).save(photo)
    x = p.decode(photo)
    assert x.shape == (3, 32, 32)
    full_t = torch.from_numpy(full).permute(2, 0, 1).unsqueeze(0).contiguous()
    with torch.no_grad():
        reference = bare(prepare_batch(full_t, pre)).softmax(1)
    torch.testing.assert_close(p.predict_proba(x.unsqueeze(0)), reference, atol=1e-5, rtol=0)
