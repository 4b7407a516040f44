"""Load test of `imclass serve` on 127.0.0.1: micro-batching against one-request-one-forward, side by side,
and a fault run mixing corrupt, huge and truncated uploads into the load.

For each mode a real `imclass serve` process is started on a free 127.0.0.1 port; ``--clients`` concurrent
clients (httpx async, each one request at a time) send real CIFAR-10 test images for ``--seconds`` seconds.
Reported: requests/s, p50/p95/p99 latency, errors (any non-200 or transport error), and the server's own
batch counters. Every answer is checked against the label the model gives in this process. Then the fault
run (micro-batching on): one request in four is bad (corrupt bytes, an upload over the size limit, a
truncated PNG, a 40,000 x 40,000 pixel bomb) and must get its 4xx; every good one must be answered correctly.

    python bench/serve_load.py                      # fast recipe model, 64 clients, 15 s per mode (~1.5 min)
    python bench/serve_load.py --clients 16 --seconds 5 --json /tmp/serve.json

Bounded: at most 256 clients and 60 s per mode; the server listens on 127.0.0.1 only.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from host import full_strength_blas  # noqa: E402

full_strength_blas()  # before numpy/torch load: peers and imclass's own numpy work on the CPU's native BLAS kernel

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host import cpu_info, cpu_line, provenance  # noqa: E402

import imclass  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_run(folder: Path, run: str | None) -> Path:
    """The model to serve: ``--run`` if given, else the fast recipe's FastNet (random weights, its TTA)."""
    if run:
        return Path(run)
    torch.manual_seed(0)
    clf = imclass.Classifier(imclass.models.create("fastnet"), classes=CLASSES,
                             mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616])
    clf.input_size, clf.tta = (3, 32, 32), "flip_translate"
    imclass.save(clf, folder / "fastnet")
    return folder / "fastnet"


def pngs(root: Path, n: int) -> tuple[list[bytes], torch.Tensor]:
    from PIL import Image

    with np.load(root / "cifar10" / "cifar10.npz") as z:
        x = z["x_test"][:n]
    blobs = []
    for a in x:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    return blobs, torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def bomb_png(side: int = 40_000) -> bytes:
    """A valid PNG header claiming side x side grey pixels, with a tiny compressed body."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, batching: bool, max_upload_mb: float, threads: int) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-c", "from imclass.cli import main; main()", "serve", str(run), "--port", str(port),
           "--batching" if batching else "--no-batching", "--max-upload-mb", str(max_upload_mb),
           "--max-queue", "1024", "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            httpx.get(url + "/health", timeout=2)
            return proc, url
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"imclass serve did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.3)


async def load(url: str, clients: int, seconds: float, good: list[bytes], labels: list[str],
               bad: list[tuple[str, bytes, int]] | None = None) -> dict:
    """``clients`` concurrent request loops for ``seconds``; every fourth request is bad when ``bad`` is given."""
    import httpx

    latencies, errors, wrong, bad_ok, bad_wrong = [], 0, 0, 0, []
    stop = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def loop(worker: int):
            nonlocal errors, wrong, bad_ok
            n = 0
            while time.monotonic() < stop:
                n += 1
                i = worker + n * clients
                if bad and (n + worker) % 4 == 0:  # one request in four of every client is bad
                    name, blob, status = bad[(n // 4 + worker) % len(bad)]
                    try:
                        r = await client.post("/predict", files=[("file", (name, blob, "image/png"))])
                        if r.status_code == status:
                            bad_ok += 1
                        else:
                            bad_wrong.append((name, r.status_code))
                    except httpx.HTTPError as err:
                        bad_wrong.append((name, type(err).__name__))
                    continue
                k = i % len(good)
                start = time.perf_counter()
                try:
                    r = await client.post("/predict", files=[("file", ("img.png", good[k], "image/png"))],
                                          data={"top_k": "1"})
                except httpx.HTTPError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)
                if r.status_code != 200:
                    errors += 1
                elif r.json()["predictions"][0]["label"] != labels[k]:
                    wrong += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(w) for w in range(clients)))
        elapsed = time.perf_counter() - t0
        stats = (await client.get("/health")).json()["stats"]
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    out = {"requests": len(latencies), "seconds": round(elapsed, 2), "rps": round(len(latencies) / elapsed, 1),
           "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
           "p99_ms": round(float(np.percentile(lat, 99)), 1), "errors": errors, "wrong_answers": wrong,
           "server": next(iter(stats.values()))}
    if bad is not None:
        out.update(bad_refused_correctly=bad_ok, bad_mishandled=bad_wrong[:10], bad_mishandled_count=len(bad_wrong))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="a run folder / model file to serve (default: the fast recipe's FastNet)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--data", default=os.environ.get("IMCLASS_DATA", "../shared/data"))
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads (both modes alike)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    clients = max(1, min(args.clients, 256))
    seconds = max(1.0, min(args.seconds, 60.0))
    print(cpu_line())
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp), args.run)
        from imclass.serve.predictor import Predictor

        good, tensor = pngs(Path(args.data), 256)
        predictor = Predictor.load(run)
        labels = [predictor.classes[i] for i in predictor.predict_many(list(tensor)).argmax(1).tolist()]
        results = {}
        for name, batching in (("micro-batching", True), ("one request, one forward", False)):
            proc, url = start_server(run, batching, max_upload_mb=1.0, threads=args.threads)
            try:
                asyncio.run(load(url, min(clients, 8), 2.0, good, labels))  # warm-up
                results[name] = asyncio.run(load(url, clients, seconds, good, labels))
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            print(f"{name:>26}: {json.dumps(results[name])}", flush=True)
        bad = [("corrupt.png", os.urandom(3000), 415), ("huge.png", b"\x89PNG" + os.urandom(1_100_000), 413),
               ("truncated.png", good[0][: len(good[0]) // 2], 422), ("bomb.png", bomb_png(), 413)]
        proc, url = start_server(run, True, max_upload_mb=1.0, threads=args.threads)
        try:
            results["fault run (micro-batching)"] = fault = asyncio.run(load(url, clients, seconds, good, labels, bad))
            alive = proc.poll() is None
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        print(f"{'fault run':>26}: {json.dumps(fault)}  server still up: {alive}")
    a, b = results["micro-batching"], results["one request, one forward"]
    ratio = a["rps"] / b["rps"] if b["rps"] else float("nan")
    print()
    print(f"{'':26} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7} {'mean batch':>10}")
    for name, r in results.items():
        print(f"{name:>26} {r['rps']:8.1f} {r['p50_ms']:8.1f} {r['p95_ms']:8.1f} {r['p99_ms']:8.1f} "
              f"{r['errors'] + r['wrong_answers']:7d} {r['server']['mean_batch']:10.1f}")
    print(f"micro-batching / one-request-one-forward throughput: {ratio:.2f}x at {clients} clients "
          f"(goal >= 2x; 0 errors)")
    print(f"fault run: {fault['bad_refused_correctly']} bad uploads refused with the right 4xx, "
          f"{fault['bad_mishandled_count']} mishandled; good requests: {fault['requests']} answered, "
          f"{fault['errors']} errors, {fault['wrong_answers']} wrong; server still up: {alive}")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": provenance(), "cpu": cpu_info(), "clients": clients, "seconds": seconds,
                                               "server_threads": args.threads,
                                               "results": results, "ratio": ratio, "server_alive": alive}, indent=2))


if __name__ == "__main__":
    main()
