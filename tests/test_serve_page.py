"""The web page at `GET /`, in a real headless Chromium: upload a real CIFAR-10 test image, see the
top-5 bars, and the label shown is the API's answer. A screenshot is kept in the test's tmp folder."""
from __future__ import annotations

import socket
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import imclass
from imclass.serve.app import ServeConfig, create_app
from imclass.serve.predictor import Predictor

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, cifar_npz):
    """A real uvicorn server (in a thread, on a free 127.0.0.1 port) serving a briefly trained FastNet."""
    import uvicorn

    root = tmp_path_factory.mktemp("page")
    x = torch.from_numpy(cifar_npz["x_train"][:512]).permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(cifar_npz["y_train"][:512].astype(np.int64))
    torch.manual_seed(0)
    clf = imclass.Classifier(imclass.models.create("fastnet", widths=(8, 16, 16), depth=1), classes=CLASSES)
    clf.compile("adam", lr=2e-3).fit((x, y), epochs=1, batch_size=128, verbose=False, seed=0)
    clf.input_size = (3, 32, 32)
    imclass.save(clf, root / "cifar_fast")
    with torch.no_grad():  # a second model that answers differently: every class 10 %
        for p in clf.model.get_classifier().parameters():
            p.zero_()
    imclass.save(clf, root / "uniform", metrics={"test_accuracy": 0.1, "accuracy": 0.99})
    app = create_app([Predictor.load(root / "cifar_fast"), Predictor.load(root / "uniform")], ServeConfig())
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield {"url": url, "root": root}
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_page_shows_the_apis_label_for_a_real_test_image(server, chromium_page, cifar_npz, tmp_path):
    image = tmp_path / "cifar_test_7.png"
    Image.fromarray(cifar_npz["x_test"][7]).save(image)
    api = httpx.post(server["url"] + "/predict", files=[("file", (image.name, image.read_bytes(), "image/png"))],
                     data={"top_k": "5"}, timeout=30).json()["predictions"][0]

    page = chromium_page
    page.goto(server["url"] + "/")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('cifar_fast')", timeout=20_000)
    page.set_input_files("#file", str(image))
    page.wait_for_selector("body[data-state=done]", timeout=30_000)
    assert page.inner_text("#label") == api["label"]
    shown = page.eval_on_selector_all("#list .bar", "rows => rows.map(r => [r.dataset.cls, r.querySelector('.p').textContent])")
    assert [c for c, _ in shown] == [t["class"] for t in api["top"]]
    assert [p for _, p in shown] == [f"{100 * t['probability']:.1f}%" for t in api["top"]]
    assert page.eval_on_selector("#preview", "img => img.complete && img.naturalWidth") == 32
    explains = httpx.get(server["url"] + "/health", timeout=10).json()["explain"]
    if explains:  # Grad-CAM overlay beside the image, where imclass.explain is installed
        page.wait_for_selector("#camcol:not([hidden])", timeout=30_000)
        page.wait_for_function("document.querySelector('#overlay').complete && "
                               "document.querySelector('#overlay').naturalWidth == 32", timeout=30_000)
    else:
        assert page.eval_on_selector("#camcol", "el => el.hidden")
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000
    assert page.console_errors == []


def test_page_reports_a_bad_upload_and_works_offline(server, chromium_page, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not a picture")
    requests = []
    chromium_page.on("request", lambda r: requests.append(r.url))
    chromium_page.goto(server["url"] + "/")
    chromium_page.wait_for_function("document.querySelector('#model').options.length == 2", timeout=20_000)
    chromium_page.set_input_files("#file", str(bad))
    chromium_page.wait_for_selector("body[data-state=error]", timeout=30_000)
    assert "415" in chromium_page.inner_text("#error") and "not a readable image" in chromium_page.inner_text("#error")
    # everything the page loads comes from this server: no CDN, works offline
    assert requests and all(u.startswith(server["url"]) or u.startswith("blob:") for u in requests)


def test_switching_models_reclassifies_and_the_status_shows_held_out_accuracy(server, chromium_page, cifar_npz,
                                                                            tmp_path):
    """The page kept the old model's bars after switching models, and re-picking the same file did nothing;
    its status showed the last training accuracy instead of the test accuracy."""
    image = tmp_path / "cifar_test_3.png"
    Image.fromarray(cifar_npz["x_test"][3]).save(image)
    page = chromium_page
    sent: list[str] = []
    page.on("request", lambda r: sent.append(r.url) if r.url.endswith("/predict") else None)
    page.goto(server["url"] + "/")
    page.wait_for_function("document.querySelector('#status').textContent.startsWith('cifar_fast')", timeout=20_000)
    page.set_input_files("#file", str(image))
    page.wait_for_selector("body[data-state=done]", timeout=30_000)
    first = page.eval_on_selector_all("#list .bar .p", "ps => ps.map(p => p.textContent)")
    page.select_option("#model", "uniform")
    page.wait_for_function("[...document.querySelectorAll('#list .bar .p')].length == 5 && "
                           "[...document.querySelectorAll('#list .bar .p')].every(p => p.textContent == '10.0%')",
                           timeout=30_000)
    assert first != ["10.0%"] * 5 and "/models/uniform/predict" in sent[-1]
    assert "test accuracy 10.0%" in page.inner_text("#status") and "99" not in page.inner_text("#status")
    before = len(sent)
    page.set_input_files("#file", str(image))  # the same file again: classified again
    page.wait_for_function(f"window.performance.getEntriesByType('resource').filter(e => e.name.endsWith('/predict')).length > {before}",
                           timeout=30_000)
    assert len(sent) > before and page.console_errors == []
