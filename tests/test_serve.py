"""`imclass serve`: the REST service answers what the model computes, batches concurrent requests, and
turns bad input into clear 4xx answers (in-process with FastAPI's TestClient / httpx, plus one real
`imclass serve` subprocess on a free 127.0.0.1 port)."""
from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import imclass
from imclass.serve.app import ServeConfig, create_app
from imclass.serve.batching import MicroBatcher, Overloaded
from imclass.serve.predictor import Predictor

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def png(array_hwc: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array_hwc).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cifar_npz, one_thread):
    """A tiny FastNet classifier (records flip_translate TTA and a history.csv) and a 3-NN, on CIFAR-10."""
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    model = imclass.models.create("fastnet", widths=(8, 16, 16), depth=1)
    clf = imclass.Classifier(model, classes=CLASSES, mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26])
    clf.input_size, clf.tta = (3, 32, 32), "flip_translate"
    imclass.save(clf, root / "fast")
    (root / "fast" / "history.csv").write_text("epoch,loss,accuracy,val_loss,val_accuracy\n1,2.1,0.25,2.0,0.3125\n")
    x = torch.from_numpy(cifar_npz["x_train"][:300]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(cifar_npz["y_train"][:300].astype(np.int64))
    knn = imclass.KNN(k=3, metric="l2").fit(x, y)
    imclass.save(knn, root / "knn", classes=CLASSES)
    images = cifar_npz["x_test"][:8]
    return {"root": root, "clf": imclass.load(root / "fast"), "knn": imclass.load(root / "knn"),
            "images": images, "pngs": [png(a) for a in images],
            "tensor": torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()}


@pytest.fixture(scope="module")
def predictors(runs):
    return [Predictor.load(runs["root"] / "fast"), Predictor.load(runs["root"] / "knn")]


def client_for(predictors, **config) -> TestClient:
    return TestClient(create_app(predictors, ServeConfig(**config)))


def files(*blobs, name="img.png"):
    return [("file", (f"{i}-{name}", b, "image/png")) for i, b in enumerate(blobs)]


def test_predict_answers_the_models_probabilities_by_class_name(runs, predictors):
    expected = runs["clf"].predict_proba(runs["tensor"][:3], tta="flip_translate")
    with client_for(predictors) as client:
        r = client.post("/predict", files=files(*runs["pngs"][:3]), data={"top_k": "10"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "fast" and body["tta"] == "flip_translate"
        assert [p["file"] for p in body["predictions"]] == ["0-img.png", "1-img.png", "2-img.png"]
        for row, pred in zip(expected, body["predictions"]):
            by_class = {t["class"]: t["probability"] for t in pred["top"]}
            assert [by_class[c] for c in CLASSES] == pytest.approx(row.tolist(), abs=1e-5)
            assert pred["label"] == CLASSES[int(row.argmax())] == pred["top"][0]["class"]
        # top_k as a query parameter works too, and is clipped to the number of classes
        r = client.post("/predict?top_k=2", files=files(runs["pngs"][0]))
        assert len(r.json()["predictions"][0]["top"]) == 2


def test_knn_is_served_with_its_vote_shares(runs, predictors):
    votes = runs["knn"].predict_proba(runs["tensor"][:4])
    with client_for(predictors) as client:
        r = client.post("/models/knn/predict", files=files(*runs["pngs"][:4]), data={"top_k": "10"})
        assert r.status_code == 200, r.text
        for row, pred in zip(votes, r.json()["predictions"]):
            by_class = {t["class"]: t["probability"] for t in pred["top"]}
            assert [by_class.get(c, 0.0) for c in CLASSES] == pytest.approx(row.tolist(), abs=1e-6)


def test_models_describe_classes_input_size_and_training_metrics(predictors):
    with client_for(predictors) as client:
        listing = client.get("/models").json()
        assert listing["default"] == "fast" and [m["name"] for m in listing["models"]] == ["fast", "knn"]
        info = client.get("/models/fast").json()
        assert info["classes"] == CLASSES and info["input_size"] == [3, 32, 32] and info["kind"] == "classifier"
        assert info["metrics"]["val_accuracy"] == 0.3125 and info["tta"] == "flip_translate"
        assert client.get("/models/knn").json()["kind"] == "knn"
        missing = client.get("/models/nope")
        assert missing.status_code == 404 and "unknown model 'nope'" in missing.json()["detail"]
        assert client.post("/models/nope/predict", files=files(b"x")).status_code == 404
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["models"] == ["fast", "knn"]
        assert "/predict" in client.get("/openapi.json").json()["paths"]


def test_bad_input_gets_a_clear_4xx_and_the_service_keeps_answering(runs, predictors):
    good = runs["pngs"][0]
    grey = io.BytesIO()
    Image.new("L", (4000, 4000)).save(grey, format="PNG")  # 16 Mpx of zeros: a ~16 KB "bomb"
    with client_for(predictors, max_upload_bytes=60_000, max_files=3, max_pixels=1_000_000) as client:
        cases = [
            (files(b"just some text, not pixels", name="notes.txt"), 415, "not a readable image"),
            (files(good[: len(good) // 2]), 422, "corrupt or truncated"),
            (files(b"\x89PNG" + os.urandom(70_000)), 413, "larger than the limit of 60,000 bytes"),
            (files(grey.getvalue(), name="bomb.png"), 413, "16,000,000 pixels exceeds the limit of 1,000,000"),
            (files(good, good, good, good), 413, "4 files in one request; at most 3"),
            (files(b""), 415, "empty file"),
        ]
        for upload, status, message in cases:
            r = client.post("/predict", files=upload)
            assert r.status_code == status, (message, r.text)
            detail = r.json()["detail"]
            assert message in detail and "Traceback" not in detail and "/imclass/" not in detail
        r = client.post("/predict", files=files(good), data={"top_k": "0"})
        assert r.status_code == 422 and "expected top_k >= 1" in r.json()["detail"]
        r = client.post("/predict", data={"top_k": "3"})
        assert r.status_code == 422 and "file" in r.json()["detail"]
        # a body larger than max_files * max_upload_bytes is refused from its Content-Length, unread
        r = client.post("/predict", content=b"0" * 300_000, headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]
        # ... and, sent chunked without a Content-Length, cut off while it streams in
        r = client.post("/predict", content=(b"0" * 50_000 for _ in range(8)),
                        headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]
        assert client.post("/predict", files=files(good)).status_code == 200  # still up


def test_api_key_is_required_when_set(runs, predictors, monkeypatch):
    with client_for(predictors, api_key="s3cret") as client:
        assert client.get("/health").status_code == 200  # liveness stays open
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer nope"}):
            r = client.post("/predict", files=files(runs["pngs"][0]), headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["detail"]
            assert client.get("/models", headers=headers).status_code == 401
        assert client.post("/predict", files=files(runs["pngs"][0]), headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get("/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    monkeypatch.setenv("IMCLASS_API_KEY", "from-env")
    with client_for(predictors) as client:
        assert client.get("/models").status_code == 401
        assert client.get("/models", headers={"X-API-Key": "from-env"}).status_code == 200


async def _concurrent(app, blobs, n):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        async def one(i):
            return await client.post("/predict", files=files(blobs[i % len(blobs)]), data={"top_k": "10"})
        return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_requests_share_forward_passes(runs, predictors, batching):
    app = create_app(predictors[:1], ServeConfig(batching=batching, max_batch=16, max_wait_ms=20))
    answers = asyncio.run(_concurrent(app, runs["pngs"], 24))
    expected = runs["clf"].predict_proba(runs["tensor"], tta="flip_translate")
    for i, r in enumerate(answers):
        assert r.status_code == 200
        by_class = {t["class"]: t["probability"] for t in r.json()["predictions"][0]["top"]}
        assert [by_class[c] for c in CLASSES] == pytest.approx(expected[i % 8].tolist(), abs=1e-5)
    stats = app.state.batchers["fast"].stats
    assert stats.images == 24
    if batching:
        assert stats.batches < 24 and stats.largest_batch > 1  # requests were answered from shared batches
    else:
        assert stats.batches == 24 and stats.largest_batch == 1  # one forward per request


def test_a_full_queue_refuses_with_503_and_retry_after(runs, predictors):
    async def scenario():
        release = asyncio.Event()
        started = asyncio.Event()
        loop = asyncio.get_running_loop()

        def slow(batch):
            loop.call_soon_threadsafe(started.set)
            asyncio.run_coroutine_threadsafe(release.wait(), loop).result()
            return torch.zeros(len(batch), 2)

        batcher = MicroBatcher(slow, max_batch=2, max_wait_ms=0, max_queue=3, retry_after=7)
        image = torch.zeros(3, 4, 4, dtype=torch.uint8)
        first = asyncio.ensure_future(batcher.predict([image, image]))
        await started.wait()
        second = asyncio.ensure_future(batcher.predict([image]))
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="at most 3") as err:
            await batcher.predict([image])
        assert err.value.retry_after == 7 and batcher.stats.refused == 1
        release.set()
        assert [len(r) for r in await first] == [2, 2] and len((await second)[0]) == 2
        batcher.close()

    asyncio.run(scenario())
    with client_for(predictors, max_queue=2, retry_after_s=3) as client:
        r = client.post("/predict", files=files(*runs["pngs"][:3]))
        assert r.status_code == 503 and r.headers["retry-after"] == "3" and "busy" in r.json()["detail"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_real_imclass_serve_process_answers_on_localhost(runs):
    port = _free_port()
    env = {**os.environ, "IMCLASS_API_KEY": "k1"}
    proc = subprocess.Popen([sys.executable, "-c", "from imclass.cli import main; main()", "serve", str(runs["root"] / "fast"),
                             str(runs["root"] / "knn"), "--port", str(port), "--threads", "1"],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(url + "/health", timeout=2).json()
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "imclass serve did not start within 60 s"
                time.sleep(0.3)
        assert health["models"] == ["fast", "knn"] and health["auth"] is True
        r = httpx.post(url + "/predict", files=files(runs["pngs"][5]), data={"top_k": "1"},
                       headers={"X-API-Key": "k1"}, timeout=30)
        expected = runs["clf"].predict_proba(runs["tensor"][5:6], tta="flip_translate")[0]
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] == CLASSES[int(expected.argmax())]
        assert httpx.post(url + "/predict", files=files(runs["pngs"][5]), timeout=30).status_code == 401
        assert "imclass" in httpx.get(url + "/", timeout=5).text
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_explain_returns_the_gradcam_overlay_of_the_predicted_class(runs, predictors):
    import base64

    from imclass import explain

    expected = explain.gradcam(runs["clf"], runs["tensor"][2])
    with client_for(predictors) as client:
        assert client.get("/health").json()["explain"] is True
        r = client.post("/explain", files=files(runs["pngs"][2]))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["index"] == expected.target and body["class"] == CLASSES[expected.target]
        assert body["probability"] == pytest.approx(expected.probability, abs=1e-5)
        overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay"].split(",", 1)[1])))
        assert overlay.size == (32, 32) and overlay.mode == "RGB"
        r = client.post("/explain", files=files(runs["pngs"][2]), data={"target": "7"})
        assert r.json()["class"] == "horse"
        r = client.post("/explain", files=files(runs["pngs"][2]), data={"model": "knn"})
        assert r.status_code == 501 and "needs a neural network" in r.json()["detail"]
