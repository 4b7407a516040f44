"""weights="imagenet" through the hub, for real: a hub-shaped HTTP server on 127.0.0.1 serves a model this
test trains, and imclass's own download code fetches, checks, caches and loads it (and says what to do
when it cannot). The padding follows the weights actually loaded: the hub's PyTorch-trained MobileNetV2
gets timm's symmetric padding, the shared TF-converted file its "same" padding."""
from __future__ import annotations

import hashlib
import http.server
import threading
import time
from pathlib import Path

import pytest
import torch

from imclass.models import create
from imclass.models.weights import (
    WeightsError, apply_weights, create_backbone, hub_file, preprocessing_for, weights_options,
)

REPO = "timm/mobilenetv2_100.ra_in1k"


class Hub(http.server.ThreadingHTTPServer):
    """Files of hub repositories, answered the way huggingface.co answers for LFS files: ``HEAD``/``GET`` on
    ``/<repo>/resolve/main/<file>`` -> 302 to the file store with ``X-Linked-Etag`` (the SHA-256)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.corrupt = False
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _answer(self, body: bool) -> None:
        hub: Hub = self.server  # type: ignore[assignment]
        hub.requests.append(f"{self.command} {self.path}")
        if self.path.startswith("/cdn/"):
            data = hub.files.get(self.path[len("/cdn/"):])
            if data is None:
                self.send_error(404)
                return
            if hub.corrupt:
                data = data[:-1] + bytes([data[-1] ^ 1])
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)
            return
        key = self.path.lstrip("/").replace("/resolve/main/", "/", 1)
        if key not in hub.files:
            self.send_error(404, "Entry not found")
            return
        self.send_response(302)
        self.send_header("Location", f"/cdn/{key}")
        self.send_header("X-Linked-Etag", f'"{hashlib.sha256(hub.files[key]).hexdigest()}"')
        self.send_header("X-Repo-Commit", "0" * 40)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):  # noqa: N802
        self._answer(body=False)

    def do_GET(self):  # noqa: N802
        self._answer(body=True)


@pytest.fixture(scope="module")
def trained(cifar_small):
    """A MobileNetV2 as the hub's is built (timm's symmetric padding), trained a few steps on CIFAR-10."""
    torch.manual_seed(0)
    model = create("timm:mobilenetv2_100", num_classes=1000)
    x, y, _, _ = cifar_small
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for i in range(3):
        batch = x[i * 16:(i + 1) * 16].float() / 255
        loss = torch.nn.functional.cross_entropy(model(batch), y[i * 16:(i + 1) * 16])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    from safetensors.torch import save

    return model, save({k: v.contiguous() for k, v in model.state_dict().items()})


@pytest.fixture
def hub(trained, monkeypatch, tmp_path):
    server = Hub({f"{REPO}/model.safetensors": trained[1]})
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("IMCLASS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield server
    server.shutdown()
    server.server_close()


def test_imagenet_downloads_from_the_hub_checks_caches_and_loads_exactly(hub, trained, tmp_path, cifar_small):
    model, payload = trained
    assert hub_file("mobilenetv2_100") == (REPO, "model.safetensors",
                                           f"{hub.url}/{REPO}/resolve/main/model.safetensors")
    empty = tmp_path / "no_weights"  # the known local file is absent: "imagenet" goes to the hub
    net, report = create_backbone("mobilenetv2_100", num_classes=1000, weights="imagenet", weights_dir=empty)
    assert report.ok and report.source == f"hub:{REPO}"
    assert report.sha256 == hashlib.sha256(payload).hexdigest()
    assert hub.requests == [f"HEAD /{REPO}/resolve/main/model.safetensors", f"GET /{REPO}/resolve/main/model.safetensors",
                            f"GET /cdn/{REPO}/model.safetensors"]
    cached = tmp_path / "cache" / "hub" / REPO / "model.safetensors"
    assert cached.read_bytes() == payload
    # the padding and preprocessing of the weights loaded (timm's, PyTorch-trained), not the TF file's
    assert type(net.conv_stem).__name__ == "Conv2d" and weights_options("mobilenetv2_100", "imagenet", empty) == {}
    assert report.preprocessing == preprocessing_for("mobilenetv2_100", "imagenet", weights_dir=empty)
    assert report.preprocessing.mean == (0.485, 0.456, 0.406)
    net.eval()
    images = cifar_small[2][:4].float() / 255
    with torch.no_grad():
        assert torch.equal(net(images), model(images))
    # a second load is served from the cache: no request reaches the hub
    hub.requests.clear()
    again = create("timm:mobilenetv2_100", num_classes=1000)
    assert apply_weights(again, "mobilenetv2_100", "imagenet", weights_dir=empty).source == f"hub:{REPO}"
    assert hub.requests == []
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))


def test_a_corrupted_download_is_refused_and_nothing_is_cached(hub, tmp_path):
    hub.corrupt = True
    model = create("timm:mobilenetv2_100", num_classes=1000)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(WeightsError, match=r"checksum mismatch for model\.safetensors .* expected SHA-256"):
        apply_weights(model, "mobilenetv2_100", "imagenet", weights_dir=tmp_path / "none")
    folder = tmp_path / "cache" / "hub" / REPO
    assert not any(folder.iterdir()) if folder.exists() else True
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    hub.corrupt = False  # the next try succeeds
    assert apply_weights(model, "mobilenetv2_100", "imagenet", weights_dir=tmp_path / "none").ok


def test_offline_uses_the_cache_and_fails_fast_without_it(hub, tmp_path, monkeypatch):
    empty = tmp_path / "none"
    model = create("timm:mobilenetv2_100", num_classes=1000)
    apply_weights(model, "mobilenetv2_100", "imagenet", weights_dir=empty)  # fills the cache
    hub.shutdown()
    hub.server_close()  # the hub is gone: the cached copy still loads
    hub.requests.clear()
    assert apply_weights(model, "mobilenetv2_100", "imagenet", weights_dir=empty).source == f"hub:{REPO}"
    monkeypatch.setenv("IMCLASS_CACHE", str(tmp_path / "other_cache"))  # nothing cached, nothing listening
    start = time.monotonic()
    with pytest.raises(WeightsError) as err:
        apply_weights(model, "mobilenetv2_100", "imagenet", weights_dir=empty)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "offline" in message and "none cached" in message and str(empty / "mobilenetv2_100-imagenet") in message
    assert "weights=PATH" in message


def test_the_shared_tf_file_keeps_its_same_padding(shared_weights, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing may be fetched
    net, report = create_backbone("mobilenetv2_100", num_classes=1000, weights="imagenet", weights_dir=shared_weights)
    assert report.source == str(shared_weights / "mobilenetv2_100-imagenet" / "model.safetensors")
    assert type(net.conv_stem).__name__ == "Conv2dSame" and report.preprocessing.mean == (0.5, 0.5, 0.5)
    # the same file given by path (or a byte-identical copy) is recognised; another file is not
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(Path(report.source).read_bytes())
    assert weights_options("mobilenetv2_100", copy, shared_weights) == {"pad_type": "same"}
    other = tmp_path / "other.safetensors"
    other.write_bytes(b"x" * 10)
    assert weights_options("mobilenetv2_100", other, shared_weights) == {}
