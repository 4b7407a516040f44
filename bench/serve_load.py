"""Load test of `imclass serve` on 127.0.0.1, steady state: micro-batched vs one-at-a-time vs a plain
FastAPI + uvicorn app doing the same forward pass, with keep-alive clients and with a new connection per
request; then a fault run mixing corrupt, huge, truncated, bomb and PostScript uploads into the load.

Servers (each a real process on a free 127.0.0.1 port, ``--threads`` torch threads):

- ``imclass micro-batched``: ``imclass serve RUN --batching``;
- ``imclass one-at-a-time``: ``imclass serve RUN --no-batching`` (one forward per request, same queue);
- ``plain FastAPI``: ``bench/plain_app.py`` (sync endpoint, PIL decode, one forward per request, ``uvicorn.run``).

Clients: ``--clients`` threads, each sending one request at a time (real CIFAR-10 test images as PNG),
either **keep-alive** (one ``httpx.Client`` per thread, its connection reused) or **new connection**
(one ``httpx.Client`` per thread keeping no idle connection: every request opens a new TCP connection). Each configuration runs ``--warmup`` s unmeasured, then
``--duration`` s measured (>= 60 s for the figures): requests started and finished inside the window
count; reported: requests/s, p50/p99 latency, errors, wrong answers (each 200 checked against the label
the model gives in this process). The servers are interleaved, ``--rounds`` rounds (order reversed every
other round): median and range per configuration. The host's provenance (bench/host.py) and the load
average before and after are written with the figures.

    python bench/serve_load.py --json bench/serve_load.json         # figures: 3 rounds x 6 configs x (60 + 5) s
    python bench/serve_load.py --duration 3 --warmup 1 --rounds 1 --fault-seconds 3 --trial   # debug (~1.5 min)

Bounded: at most 256 clients and 600 s per configuration; servers listen on 127.0.0.1 only.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host  # noqa: E402

host.full_strength_blas()

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import zlib  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import imclass  # noqa: E402

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BENCH = Path(__file__).resolve().parent
SERVERS = ("imclass micro-batched", "imclass one-at-a-time", "plain FastAPI")
CLIENT_MODES = ("keep-alive", "new connection")
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nnewpath 0 0 moveto 16 16 lineto stroke\nshowpage\n"


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


def start_server(kind: str, run: Path, threads: int, max_upload_mb: float = 1.0) -> tuple[subprocess.Popen, str]:
    """Start one of ``SERVERS`` and wait until it answers ``/health``."""
    import httpx

    port = free_port()
    if kind == "plain FastAPI":
        cmd = [sys.executable, str(BENCH / "plain_app.py"), str(run), str(port), str(threads)]
    else:
        cmd = [sys.executable, "-m", "imclass", "serve", str(run), "--port", str(port),
               "--batching" if kind == "imclass micro-batched" else "--no-batching",
               "--max-upload-mb", str(max_upload_mb), "--max-queue", "1024", "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=host.clean_env())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(url + "/health", timeout=2)
            return proc, url
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.3)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_load(url: str, clients: int, warmup: float, duration: float, good: list[bytes], labels: list[str],
             keep_alive: bool, bad: list[tuple[str, bytes, int]] | None = None) -> dict:
    """``clients`` threads sending one request at a time for ``warmup + duration`` s; the last ``duration`` s count.

    With ``bad``, every fourth request of a thread is a bad upload that must get its status.
    """
    import httpx

    t0 = time.monotonic()
    start_window, end_window = t0 + warmup, t0 + warmup + duration
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"errors": 0, "wrong": 0, "bad_ok": 0}
    bad_wrong: list = []

    def one(client, worker: int, n: int) -> None:
        if bad and (n + worker) % 4 == 0:
            name, blob, status = bad[(n // 4 + worker) % len(bad)]
            try:
                r = client.post(url + "/predict", files=[("file", (name, blob, "image/png"))])
                ok, got = r.status_code == status, r.status_code
            except httpx.HTTPError as err:
                ok, got = False, type(err).__name__
            with lock:
                if ok:
                    counts["bad_ok"] += 1
                else:
                    bad_wrong.append((name, got))
            return
        k = (worker + n * clients) % len(good)
        started = time.monotonic()
        try:
            r = client.post(url + "/predict", files=[("file", ("img.png", good[k], "image/png"))], data={"top_k": "1"})
            status = r.status_code
            label = r.json()["predictions"][0]["label"] if status == 200 else None
        except (httpx.HTTPError, ValueError, KeyError):
            status, label = None, None
        finished = time.monotonic()
        if started < start_window or finished > end_window:
            return  # warm-up, or cut by the end of the window
        with lock:
            if status != 200:
                counts["errors"] += 1
            else:
                latencies.append(finished - started)
                if label != labels[k]:
                    counts["wrong"] += 1

    def worker(w: int) -> None:
        n = 0
        # one client per thread: its connection reused (keep-alive), or closed after every answer so that
        # each request opens a new TCP connection (without the cost of building a client per request)
        limits = httpx.Limits(max_keepalive_connections=None if keep_alive else 0)
        with httpx.Client(timeout=60, limits=limits) as client:
            while time.monotonic() < end_window:
                n += 1
                one(client, w, n)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lat = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    out = {"requests": len(latencies), "window_s": duration, "rps": round(len(latencies) / duration, 2),
           "p50_ms": round(float(np.percentile(lat, 50)), 2), "p99_ms": round(float(np.percentile(lat, 99)), 2),
           "errors": counts["errors"], "wrong_answers": counts["wrong"]}
    if bad is not None:
        out.update(bad_refused_correctly=counts["bad_ok"], bad_mishandled=bad_wrong[:10],
                   bad_mishandled_count=len(bad_wrong))
    return out


def spread(values: list[float]) -> dict:
    """Median and range of one figure over the rounds."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", help="a run folder / model file to serve (default: the fast recipe's FastNet)")
    parser.add_argument("--clients", type=int, default=16, help="client threads, one request at a time each")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds per configuration (>= 60)")
    parser.add_argument("--warmup", type=float, default=5.0, help="unmeasured seconds before each window")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median and range)")
    parser.add_argument("--fault-seconds", type=float, default=15.0, help="the fault run (0: skip it)")
    parser.add_argument("--data", default=os.environ.get("IMCLASS_DATA", str(BENCH.parent.parent / "shared" / "data")))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every server")
    parser.add_argument("--trial", action="store_true", help="a debugging run on a busy host: record the load, "
                        "do not refuse the figures")
    parser.add_argument("--json", help="write the figures and the host's provenance here")
    args = parser.parse_args()
    clients = max(1, min(args.clients, 256))
    duration = max(1.0, min(args.duration, 600.0))
    rounds = max(1, args.rounds)
    if not args.trial and (duration < 60 or rounds < 3):
        parser.error("figures need --duration >= 60 and --rounds >= 3 (or --trial for a debugging run)")
    print(host.cpu_line(), flush=True)
    guard = host.LoadGuard(strict=False)  # the load test itself keeps every core busy: judged on the load before
    quiet_before = guard.before[0] <= 1.0
    if not quiet_before and not args.trial:
        raise SystemExit(f"load average {guard.before[0]:.2f} before the run: the host is not quiet; re-run later "
                         "(or pass --trial)")
    per_round: dict[str, list[dict]] = {f"{s} / {c}": [] for s in SERVERS for c in CLIENT_MODES}
    with tempfile.TemporaryDirectory() as tmp:
        run = make_run(Path(tmp), args.run)
        from imclass.serve.predictor import Predictor

        good, tensor = pngs(Path(args.data), 256)
        predictor = Predictor.load(run)
        labels = [predictor.classes[i] for i in predictor.predict_many(list(tensor)).argmax(1).tolist()]
        for r in range(rounds):
            order = SERVERS if r % 2 == 0 else tuple(reversed(SERVERS))
            for kind in order:
                proc, url = start_server(kind, run, args.threads)
                try:
                    for mode in CLIENT_MODES if r % 2 == 0 else tuple(reversed(CLIENT_MODES)):
                        res = run_load(url, clients, args.warmup, duration, good, labels, keep_alive=mode == "keep-alive")
                        per_round[f"{kind} / {mode}"].append(res)
                        print(f"round {r + 1} {kind:>22} / {mode:<14} {json.dumps(res)}", flush=True)
                finally:
                    stop_server(proc)
        fault = None
        if args.fault_seconds > 0:
            bad = [("corrupt.png", os.urandom(3000), 415), ("huge.png", b"\x89PNG" + os.urandom(1_100_000), 413),
                   ("truncated.png", good[0][: len(good[0]) // 2], 422), ("bomb.png", bomb_png(), 413),
                   ("eps.png", EPS, 415)]
            proc, url = start_server("imclass micro-batched", run, args.threads)
            try:
                fault = run_load(url, clients, 1.0, args.fault_seconds, good, labels, True, bad)
                fault["server_alive"] = proc.poll() is None
            finally:
                stop_server(proc)
            print(f"fault run: {json.dumps(fault)}", flush=True)
    load = guard.check()
    summary = {}
    for name, results in per_round.items():
        summary[name] = {key: spread([res[key] for res in results]) for key in ("rps", "p50_ms", "p99_ms")}
        summary[name]["errors"] = sum(res["errors"] for res in results)
        summary[name]["wrong_answers"] = sum(res["wrong_answers"] for res in results)
    print()
    print(f"{clients} clients, {duration:g} s steady state per configuration, {rounds} round(s), median [min-max]")
    print(f"{'server / clients':<40} {'req/s':>22} {'p50 ms':>22} {'p99 ms':>22} {'errors':>7}")

    def cell(s: dict) -> str:
        return f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]"

    for name, s in summary.items():
        print(f"{name:<40} {cell(s['rps']):>22} {cell(s['p50_ms']):>22} {cell(s['p99_ms']):>22} "
              f"{s['errors'] + s['wrong_answers']:>7}")
    for mode in CLIENT_MODES:
        mb, one, plain = (summary[f"{s} / {mode}"]["rps"]["median"] for s in SERVERS)
        print(f"{mode}: micro-batched / one-at-a-time {mb / one:.2f}x, micro-batched / plain FastAPI {mb / plain:.2f}x "
              "(throughput)" if one and plain else f"{mode}: no throughput to compare")
    if not quiet_before:
        print(f"trial run: load average {guard.before[0]:.2f} before, {load['load_after'][0]:.2f} after: "
              "not figures to publish")
    if args.json:
        host.write_result(args.json, {
            "clients": clients, "duration_s": duration, "warmup_s": args.warmup, "rounds": rounds,
            "server_threads": args.threads, "trial": args.trial, "quiet_before": quiet_before,
            "summary": summary, "rounds_detail": per_round, "fault_run": fault}, guard=guard)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
