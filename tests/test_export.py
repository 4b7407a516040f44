"""`imclass export`: ONNX and TorchScript exports give PyTorch's outputs (within 1e-4, on real CIFAR-10 test
images, onnxruntime), carry their class names and preprocessing, and run in `imclass predict` / `serve`."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

import imclass
from imclass.cli import app
from imclass.serve.app import create_app
from imclass.serve.export import export
from imclass.serve.predictor import Predictor

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, cifar_npz, one_thread):
    """A small FastNet (briefly trained, flip_translate TTA) and a 5-NN, each saved and exported once."""
    root = tmp_path_factory.mktemp("export")
    x = torch.from_numpy(cifar_npz["x_train"][:512]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(cifar_npz["y_train"][:512].astype(np.int64))
    torch.manual_seed(0)
    clf = imclass.Classifier(imclass.models.create("fastnet", widths=(8, 16, 16), depth=1), classes=CLASSES)
    clf.compile("adam", lr=2e-3).fit((x, y), epochs=1, batch_size=128, verbose=False, seed=0)
    clf.input_size, clf.tta = (3, 32, 32), "flip_translate"
    imclass.save(clf, root / "fast")
    knn = imclass.KNN(k=5, metric="l2").fit(x[:400], y[:400])
    imclass.save(knn, root / "knn", classes=CLASSES)
    return {"root": root, "clf": imclass.load(root / "fast"), "knn": imclass.load(root / "knn"),
            "onnx": export(root / "fast", root / "fast.onnx"), "knn_onnx": export(root / "knn", root / "knn.onnx"),
            "test": torch.from_numpy(cifar_npz["x_test"][:64]).permute(0, 3, 1, 2).contiguous()}


def run_onnx(path, images: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": images.numpy()})[0])


def test_onnx_logits_match_pytorch_on_real_test_images_at_any_batch_size(exported):
    clf, test = exported["clf"], exported["test"]
    expected = clf.predict_logits(test, tta="flip_translate")
    assert not torch.allclose(expected, clf.predict_logits(test), atol=1e-3)  # the TTA is in the graph
    torch.testing.assert_close(run_onnx(exported["onnx"], test), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(run_onnx(exported["onnx"], test[:1]), expected[:1], atol=1e-4, rtol=0)
    torch.testing.assert_close(run_onnx(exported["onnx"], test[:7]), expected[:7], atol=1e-4, rtol=0)


def test_onnx_metadata_names_the_classes_and_preprocessing(exported):
    props = {p.key: p.value for p in onnx.load(str(exported["onnx"])).metadata_props}
    meta = json.loads(props["imclass"])
    assert meta["classes"] == CLASSES and meta["preprocessing"]["input_size"] == [3, 32, 32]
    assert meta["tta"] == "flip_translate" and meta["output"] == "logits" and meta["kind"] == "classifier"
    p = Predictor.load(exported["onnx"])
    assert p.kind == "onnx" and p.classes == CLASSES and p.input_size == (3, 32, 32)
    torch.testing.assert_close(p.predict_proba(exported["test"][:16]),
                               exported["clf"].predict_proba(exported["test"][:16], tta="flip_translate"),
                               atol=1e-5, rtol=0)


def test_knn_exports_its_search_and_vote(exported):
    votes = exported["knn"].predict_proba(exported["test"]).float()
    torch.testing.assert_close(run_onnx(exported["knn_onnx"], exported["test"]), votes, atol=1e-6, rtol=0)
    assert Predictor.load(exported["knn_onnx"]).classes == CLASSES


def test_torchscript_matches_pytorch(exported, tmp_path):
    result = runner.invoke(app, ["export", str(exported["root"] / "fast"), "--format", "torchscript",
                                 "--out", str(tmp_path / "m.pt"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "torchscript" and report["max_abs_diff"] <= 1e-4
    assert "TracerWarning" not in result.output  # traced at one size on purpose: no warning for the user
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(tmp_path / "m.pt"))
    with torch.no_grad():
        got = scripted(exported["test"])
    torch.testing.assert_close(got, exported["clf"].predict_logits(exported["test"], tta="flip_translate"),
                               atol=1e-4, rtol=0)


def test_predict_and_serve_run_the_onnx_file_like_the_model_file(exported, tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"t{i}.png")
        Image.fromarray(exported["test"][i].permute(1, 2, 0).numpy()).save(paths[-1])
    from_onnx = runner.invoke(app, ["predict", str(exported["onnx"]), *map(str, paths), "-k", "3", "--json"])
    from_file = runner.invoke(app, ["predict", str(exported["root"] / "fast"), *map(str, paths), "-k", "3", "--json"])
    a, b = json.loads(from_onnx.stdout), json.loads(from_file.stdout)
    assert [[t["class"] for t in p["top"]] for p in a["predictions"]] == \
        [[t["class"] for t in p["top"]] for p in b["predictions"]]
    for pa, pb in zip(a["predictions"], b["predictions"]):
        assert [t["probability"] for t in pa["top"]] == pytest.approx([t["probability"] for t in pb["top"]], abs=1e-5)
    with TestClient(create_app([Predictor.load(exported["onnx"])])) as client:
        r = client.post("/predict", files=[("file", ("t0.png", paths[0].read_bytes(), "image/png"))])
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == b["predictions"][0]["top"][0]["class"]
        assert client.get("/models/fast").json()["kind"] == "onnx"


def test_export_errors_are_one_line(exported, tmp_path):
    result = runner.invoke(app, ["export", str(exported["root"] / "fast"), "--format", "tflite"])
    assert result.exit_code == 2 and "expected --format in ['onnx', 'torchscript']" in result.stderr
    result = runner.invoke(app, ["export", str(tmp_path / "absent"), "--out", str(tmp_path / "x.onnx")])
    assert result.exit_code == 2 and "no such model file or run folder" in result.stderr
    (tmp_path / "fake.onnx").write_bytes(b"not onnx")
    result = runner.invoke(app, ["predict", str(tmp_path / "fake.onnx"), str(tmp_path / "a.png")])
    assert result.exit_code == 2 and "not a readable ONNX file" in result.stderr
    assert "Traceback" not in result.output
