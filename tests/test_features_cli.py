"""``imclass features`` and ``imclass similar`` on a folder of real CIFAR-10 images the test writes, with a
tiny trained run as the embedder; the real MobileNetV2 weights on a few flowers photos when present."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from imclass import models
from imclass.cli import app
from imclass.io import save
from imclass.train import Classifier

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = ["airplane", "cat", "ship"]  # CIFAR-10 labels 0, 3, 8


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def folder(tmp_path_factory, cifar_npz) -> Path:
    """A plain class-per-folder tree of 3 x 10 real CIFAR-10 PNGs (32x32, lossless)."""
    root = tmp_path_factory.mktemp("feat") / "pics"
    for name, label in zip(CLASSES, (0, 3, 8)):
        for i, j in enumerate(np.flatnonzero(cifar_npz["y_train"] == label)[:10]):
            path = root / name / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(cifar_npz["x_train"][j]).save(path)
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory, folder) -> Path:
    """A tiny MLP (one hidden layer of 16) trained 2 epochs on the folder, saved as a run folder."""
    from imclass.data import load

    ds = load(folder, split="all")
    torch.manual_seed(0)
    clf = Classifier(models.create("mlp", num_classes=3, hidden=[16]), classes=ds.classes, device="cpu")
    clf.compile("adam", lr=1e-2).fit(ds, epochs=2, batch_size=8, seed=0, verbose=False)
    out = tmp_path_factory.mktemp("runs") / "mlp"
    save(clf, out)
    return out


@pytest.fixture(scope="module")
def exported(run, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "feats.npz"
    result = invoke("features", run, folder, "--out", out, "--cache", "none", "--amp", "none")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: 30 embeddings of 16 values" in result.stdout
    with np.load(out, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_features_are_the_penultimate_layer(exported, run, folder):
    from imclass.io import load

    clf = load(run)
    paths = [folder / p for p in exported["paths"]]
    x = torch.stack([torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in paths])
    mean, std = torch.tensor(clf.mean).view(1, 3, 1, 1), torch.tensor(clf.std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = clf.model.forward_features((x.float() / 255 - mean) / std)  # (N, 16): the hidden Dense's output
    assert exported["features"].shape == (30, 16) and exported["features"].dtype == np.float32
    assert np.allclose(exported["features"], expected.numpy(), atol=1e-5)
    assert list(exported["classes"]) == CLASSES
    assert exported["labels"].tolist() == [0] * 10 + [1] * 10 + [2] * 10
    assert exported["paths"][0] == "airplane/00.png" and set(exported["splits"]) == {"all"}
    meta = json.loads(str(exported["meta"]))
    assert meta["preprocessing"]["input_size"] == [3, 32, 32] and meta["model"] == str(run)


def test_parquet_round_trip(exported, run, folder, tmp_path):
    import pyarrow.parquet as pq  # a dev dependency: CI fails at session start without it
    out = tmp_path / "feats.parquet"
    result = invoke("features", run, folder, "--out", out, "--cache", "none", "--amp", "none")
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.column("path").to_pylist() == exported["paths"].tolist()
    assert table.column("class").to_pylist()[10] == "cat"
    assert np.allclose(np.array(table.column("features").to_pylist(), dtype=np.float32), exported["features"])
    assert json.loads(table.schema.metadata[b"imclass"])["classes"] == CLASSES


def test_similar_finds_the_query_itself_and_matches_sklearn(exported, run, folder, tmp_path):
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

    query = folder / "cat" / "03.png"
    report = tmp_path / "report.json"
    result = invoke("similar", query, "--in", folder, "--backbone", run, "-k", 4, "--cache", "none", "--amp", "none",
                    "--report", report, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert json.loads(report.read_text()) == out
    neighbours = out["queries"][0]["neighbours"]
    assert neighbours[0]["path"] == "cat/03.png" and abs(neighbours[0]["distance"]) < 1e-6
    feats = exported["features"]
    nn = NearestNeighbors(n_neighbors=4, metric="cosine", algorithm="brute").fit(feats)
    dist, idx = nn.kneighbors(feats[13:14])
    assert [n["path"] for n in neighbours] == [exported["paths"][i] for i in idx[0]]
    assert np.allclose([n["distance"] for n in neighbours], dist[0], atol=1e-5)
    # the report: k-NN on the 80/20 split of the folder, deep features (cosine) and raw pixels (L2)
    from imclass.data.split import split_indices

    labels = torch.from_numpy(exported["labels"])
    train, test = split_indices(labels, 0.2, seed=0)
    rows = {(r["representation"], r["metric"], r["k"]): r["accuracy"] for r in out["report"]["rows"]}
    knn = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute").fit(feats[train], exported["labels"][train])
    assert rows[("deep features", "cosine", 1)] == pytest.approx(knn.score(feats[test], exported["labels"][test]))
    pixels = np.stack([np.asarray(Image.open(folder / p)).transpose(2, 0, 1).reshape(-1) for p in exported["paths"]])
    knn = KNeighborsClassifier(n_neighbors=1, algorithm="brute").fit(pixels[train].astype(float), exported["labels"][train])
    assert rows[("raw pixels", "l2", 1)] == pytest.approx(knn.score(pixels[test].astype(float), exported["labels"][test]))
    assert out["report"]["train"] == 24 and out["report"]["test"] == 6


def test_similar_table(run, folder):
    result = invoke("similar", folder / "ship" / "00.png", "--in", folder, "--backbone", run, "-k", 2, "--cache", "none")
    assert result.exit_code == 0, result.output
    assert "the 2 nearest of 30 images in" in result.stdout
    assert "   1. 0.0000  ship/00.png  [ship]" in result.stdout
    assert "deep features   cosine        16   1" in result.stdout and "raw pixels      l2         3,072   1" in result.stdout


def test_errors_are_one_line(run, folder, tmp_path):
    result = invoke("features", run, folder, "--out", tmp_path / "f.csv")
    assert result.exit_code == 2 and "error: expected --out ending in .npz or .parquet, received 'f.csv'" in result.output
    result = invoke("features", run, tmp_path / "nowhere", "--out", tmp_path / "f.npz")
    assert result.exit_code == 2 and "error: unknown data set" in result.output
    result = invoke("similar", tmp_path / "missing.png", "--in", folder, "--backbone", run, "--cache", "none")
    assert result.exit_code == 2 and "error: no such image file:" in result.output and "missing.png" in result.output
    result = invoke("similar", folder / "cat" / "00.png", "--in", folder, "--backbone", run, "-k", 0)
    assert result.exit_code == 2 and "error: expected -k >= 1, received 0" in result.output
    from imclass.knn import KNN

    knn_file = save(KNN(k=1).fit(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1])), tmp_path / "knn")
    result = invoke("features", knn_file, folder, "--out", tmp_path / "f.npz")
    assert result.exit_code == 2 and "model file has no network features" in result.output


def test_feature_cache_is_reused(run, folder, tmp_path):
    cache = tmp_path / "cache"
    for _ in range(2):
        result = invoke("features", run, folder, "--out", tmp_path / "f.npz", "--cache", cache)
        assert result.exit_code == 0, result.output
    assert len(list(cache.glob("**/*.safetensors"))) == 1


def test_mobilenet_retrieval_on_flowers(data_root, tmp_path):
    """The real ImageNet MobileNetV2: the nearest photos of a held-out daisy / rose / sunflower share its class."""
    weights = Path(os.environ.get("IMCLASS_WEIGHTS", data_root.parent / "weights"))
    photos = data_root / "flowers" / "photos"
    if not (weights / "mobilenetv2_100-imagenet" / "model.safetensors").is_file() or not photos.is_dir():
        pytest.skip(f"needs the MobileNetV2 weights under {weights} and the flowers photos under {photos}")
    folder = tmp_path / "flowers"
    queries = []
    for name in ("daisy", "roses", "sunflowers"):
        files = sorted((photos / name).iterdir())[:9]
        (folder / name).mkdir(parents=True)
        for f in files[:8]:
            (folder / name / f.name).symlink_to(f)
        queries.append(files[8])
    result = invoke("similar", *queries, "--in", folder, "--backbone", "mobilenetv2_100", "--weights-dir", weights,
                    "-k", 3, "--cache", "none", "--no-compare", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for q, name in zip(out["queries"], ("daisy", "roses", "sunflowers")):
        assert [n["class"] for n in q["neighbours"]][:2] == [name, name], q
