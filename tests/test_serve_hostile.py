"""`imclass serve` under hostile input: formats, decode memory, auth before the body, keys as bytes, Host
checks, header and body timeouts, /explain admission, TCP_NODELAY (in-process ASGI calls, plus one real
`imclass serve` subprocess shared by the socket-level tests)."""
from __future__ import annotations

import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

import imclass
from imclass.serve.app import ServeConfig, create_app
from imclass.serve.predictor import Predictor
from imclass.serve.server import default_allowed_hosts, listen

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n%%EndComments\n"
       b"newpath 0 0 moveto 16 0 lineto 16 16 lineto closepath fill\nshowpage\n%%EOF\n")
CLASSES = ["a", "b", "c"]


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    model = imclass.models.create("fastnet", widths=(8, 16, 16), depth=1, num_classes=3)
    clf = imclass.Classifier(model, classes=CLASSES, mean=[0.5] * 3, std=[0.25] * 3)
    clf.input_size = (3, 32, 32)
    imclass.save(clf, root / "fast")
    return root / "fast"


@pytest.fixture(scope="module")
def predictor(run_dir):
    return Predictor.load(run_dir)


def photo() -> bytes:
    return png(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))


def test_postscript_upload_gets_415_and_no_internal_detail(predictor):
    with TestClient(create_app([predictor])) as client:
        r = client.post("/predict", files={"file": ("cat.png", EPS, "image/png")})
    assert r.status_code == 415
    assert r.json()["detail"] == ("cat.png: not a readable image in an accepted format "
                                  "(expected JPEG, PNG, BMP, GIF, WebP or TIFF data)")


def _call(app, scope_headers, body_chunks, path="/predict"):
    """Call the ASGI app directly; returns (status, body, number of receive() calls)."""
    received = []
    sent = []

    async def receive():
        received.append(1)
        if body_chunks:
            chunk = body_chunks.pop(0)
            if chunk is None:  # a client that stops sending
                await asyncio.sleep(3600)
            return {"type": "http.request", "body": chunk, "more_body": bool(body_chunks)}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"localhost"), *scope_headers], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def go():
        await asyncio.wait_for(app(scope, receive, send), 10)

    asyncio.run(go())
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, len(received)


def test_the_key_is_checked_before_any_body_byte_is_read(predictor):
    app = create_app([predictor], ServeConfig(api_key="s3cret"))
    big = [b"x" * 65536] * 2000  # 130 MB, never asked for
    status, body, reads = _call(app, [(b"content-type", b"multipart/form-data; boundary=b")], big)
    assert (status, reads) == (401, 0)
    assert b"missing or wrong API key" in body
    status, _, reads = _call(app, [(b"x-api-key", b"wrong")], big)
    assert (status, reads) == (401, 0)


def test_keys_compare_as_bytes_so_non_ascii_keys_work(predictor):
    app = create_app([predictor], ServeConfig(api_key="clé-ü"))
    with TestClient(app) as client:
        ok = client.post("/predict", files={"file": ("x.png", photo(), "image/png")},
                         headers={"X-API-Key": "clé-ü".encode()})
        assert ok.status_code == 200, ok.text
        bearer = client.get("/models", headers={"Authorization": b"Bearer " + "clé-ü".encode()})
        assert bearer.status_code == 200
        assert client.get("/models", headers={"X-API-Key": "cle-u"}).status_code == 401
        assert client.get("/health").status_code == 200  # liveness and the page need no key


def test_an_empty_key_is_refused_at_start_up(predictor, run_dir, monkeypatch):
    with pytest.raises(ValueError, match="expected a non-empty API key"):
        ServeConfig(api_key="")
    monkeypatch.setenv("IMCLASS_API_KEY", "  ")
    with pytest.raises(ValueError, match="expected a non-empty API key"):
        create_app([predictor])
    from imclass.cli import app as cli_app

    result = CliRunner().invoke(cli_app, ["serve", str(run_dir), "--api-key", "", "--port", "0"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: expected a non-empty API key") and "Traceback" not in result.output
    monkeypatch.delenv("IMCLASS_API_KEY")
    result = CliRunner().invoke(cli_app, ["serve", str(run_dir), "--port", "70000"])
    assert (result.exit_code, result.output.strip()) == (2, "error: expected a TCP port in 0..65535, received --port 70000")


def test_hosts_outside_the_allowed_list_get_400(predictor):
    assert default_allowed_hosts("127.0.0.1") == ("127.0.0.1", "localhost", "::1")
    assert default_allowed_hosts("::1") == ("::1", "localhost", "127.0.0.1")
    assert default_allowed_hosts("10.1.2.3") == ("10.1.2.3",)
    assert default_allowed_hosts("0.0.0.0") is None
    app = create_app([predictor], ServeConfig(allowed_hosts=("127.0.0.1", "localhost")))
    with TestClient(app, base_url="http://localhost:8000") as client:
        assert client.get("/health").status_code == 200
        assert client.get("/health", headers={"Host": "127.0.0.1:8000"}).status_code == 200
        r = client.get("/health", headers={"Host": "attacker.example"})
        assert r.status_code == 400 and "invalid Host header" in r.json()["detail"]


def test_a_body_that_stops_arriving_gets_408(predictor):
    app = create_app([predictor], ServeConfig(body_timeout_s=0.5))
    start = time.perf_counter()
    status, body, _ = _call(app, [(b"content-type", b"multipart/form-data; boundary=b")], [b"--b\r\n", None])
    assert time.perf_counter() - start < 5
    assert status == 408 and b"did not arrive within 0.5 s" in body


def test_explain_is_under_the_same_queue_bound_as_predict(predictor):
    pytest.importorskip("imclass.explain", reason="imclass.explain (Grad-CAM) is not installed")
    app = create_app([predictor], ServeConfig(max_queue=8, explain_weight=4))
    upload = {"file": ("x.png", photo(), "image/png")}
    with TestClient(app) as client:
        assert client.post("/explain", files=upload).status_code == 200
        batcher = app.state.batchers["fast"]
        with batcher.admit(5):  # 5 of 8 places taken: an explanation (4) no longer fits, one image (1) still does
            r = client.post("/explain", files=upload)
            assert r.status_code == 503 and r.headers["Retry-After"] == "1"
            assert client.post("/predict", files=upload).status_code == 200
        assert client.post("/explain", files=upload).status_code == 200
        assert client.get("/health").json()["stats"]["fast"]["refused"] == 1


def test_the_listening_socket_sets_tcp_nodelay():
    sock = listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP  # asyncio sets TCP_NODELAY on accepted sockets only then
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        sock.close()


# ------------------------------------------------------------------------------ one real server

@pytest.fixture(scope="module")
def server(run_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("IMCLASS_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "imclass", "serve", str(run_dir), "--port", str(port),
                             "--threads", "1", "--header-timeout", "1"],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            httpx.get(url + "/health", timeout=2)
            break
        except httpx.TransportError:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "imclass serve did not start within 90 s"
            time.sleep(0.3)
    yield {"url": url, "port": port, "pid": proc.pid}
    proc.terminate()
    proc.wait(timeout=20)


def test_keep_alive_requests_do_not_wait_for_nagle(server):
    with httpx.Client(base_url=server["url"], timeout=5) as client:  # one connection, reused
        client.get("/health")
        times = []
        for _ in range(15):
            start = time.perf_counter()
            assert client.get("/health").status_code == 200
            times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.03  # 44 ms each with Nagle + delayed ACK


def test_idle_and_slow_header_connections_are_closed(server):
    for sent in (b"", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n"):  # nothing; headers never finished
        with socket.create_connection(("127.0.0.1", server["port"]), timeout=10) as s:
            s.sendall(sent)
            start = time.perf_counter()
            assert s.recv(1024) == b""  # closed by the server, without an answer
            assert time.perf_counter() - start < 5


def _peak_rss(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return int(fields["VmHWM"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024


def test_sixteen_concurrent_huge_pngs_keep_the_server_under_2_gb(server):
    a = np.zeros((6300, 6300, 3), np.uint8)
    a[::97, :, 0] = 255  # a little structure; still a ~100 KB file that decodes to 119 MB
    bomb = png(a)
    del a
    assert len(bomb) < 1_000_000
    statuses = []

    def post():
        with httpx.Client(timeout=300) as client:
            statuses.append(client.post(server["url"] + "/predict", files={"file": ("big.png", bomb, "image/png")}).status_code)

    threads = [threading.Thread(target=post) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    peak, now = _peak_rss(server["pid"])
    assert statuses == [200] * 16
    assert peak < 2 * 1024**3, f"peak RSS {peak / 1e9:.2f} GB"
    r = httpx.post(server["url"] + "/predict", files={"file": ("x.png", photo(), "image/png")}, timeout=30)
    assert r.status_code == 200 and r.json()["predictions"][0]["label"] in CLASSES
