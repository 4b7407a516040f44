"""Data of any size: peak anonymous memory and wall time of each tier against N, and images/s against
torchvision's ``ImageFolder`` + ``DataLoader`` (same workers, same transforms), interleaved.

Synthetic photo-like JPEGs (400x300, 10 classes: smooth random fields with a class tint and noise) are
generated once under ``--root`` (default /tmp/imclass_data_scale; never committed): the largest N once,
the smaller sets as hard-link trees of its first files. Every measurement runs in a fresh child process
(``python bench/data_scale.py --child ...``), which samples its own and its DataLoader workers' ``RssAnon``
every 20 ms and reads ``VmHWM`` at the end, so each tier's peak is its own.

Per N (5k, 20k, 100k by default), one pass each:
  memory   decode every image into one tensor (``open_images(..., "memory")``)
  cache    build the memory-mapped cache (cold), re-open it in a new process (start-up), one warm epoch
  stream   one epoch of the stream tier (DataLoader workers decoding the files)
  torchvision  one epoch of ImageFolder + DataLoader (PIL decode, Resize, PILToTensor)
Throughput, interleaved (ABAB, ``--rounds`` >= 3, median and range) on the smallest N, in one child:
  stream epoch vs torchvision epoch; cache build vs torchvision epoch; warm-cache epoch vs torchvision epoch.

Goals (issue 26): cache/stream peak anon RSS <= 1.5 GB, flat from 5k to 100k; start-up on an existing
cache < 1 s; cache build >= 0.9x torchvision's decode throughput; warm-cache epochs >= 20x that; streaming
within 10 % of torchvision at the same workers.

    python bench/data_scale.py                                   # 5k, 20k, 100k; writes bench/data_scale.json
    python bench/data_scale.py --sizes 300,600 --rounds 3 --out /tmp/ds.json --no-guard   # a quick trial
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

T_START = time.perf_counter()  # a child's start, before its imports (start-up's constant part)

from multiprocessing import Pool  # noqa: E402
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import host  # noqa: E402  (bench/host.py: provenance, interleave, load guard)

CLASSES = 10
PHOTO = (400, 300)  # width, height of the generated JPEGs


# ------------------------------------------------------------------------------ the photos

def _photo(args: tuple[str, int]) -> None:
    import numpy as np
    from PIL import Image

    path, seed = args
    rng = np.random.default_rng(seed)
    label = seed % CLASSES
    tint = np.array([(label * 37) % 255, (label * 91) % 255, (label * 151) % 255], dtype=np.float32)
    coarse = rng.normal(128, 60, (9, 12, 3)).astype(np.float32) * 0.6 + tint * 0.4
    small = Image.fromarray(np.clip(coarse, 0, 255).astype(np.uint8)).resize(PHOTO, Image.BICUBIC)
    pixels = np.asarray(small, dtype=np.float32) + 12 * rng.standard_normal((PHOTO[1], PHOTO[0], 3), dtype=np.float32)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=88)


def make_photos(root: Path, sizes: list[int], workers: int) -> dict[int, Path]:
    """Generate the largest set once (``root/all``), and each N as a hard-link tree ``root/n<N>`` of its
    first N files (N/10 per class). Existing complete sets are reused."""
    biggest = max(sizes)
    every = root / "all"
    done = every / f".complete-{biggest}"
    if not done.exists():
        for c in range(CLASSES):
            (every / f"class{c}").mkdir(parents=True, exist_ok=True)
        todo = [(str(every / f"class{i % CLASSES}" / f"{i // CLASSES:07d}.jpg"), i) for i in range(biggest)
                if not (every / f"class{i % CLASSES}" / f"{i // CLASSES:07d}.jpg").exists()]
        start = time.perf_counter()
        with Pool(workers) as pool:
            for k, _ in enumerate(pool.imap_unordered(_photo, todo, chunksize=64)):
                if k % 5000 == 0:
                    print(f"  generating photos: {k:,} of {len(todo):,} ({time.perf_counter() - start:.0f} s)", flush=True)
        done.write_text("")
    out = {}
    for n in sizes:
        folder = root / f"n{n}"
        if not (folder / ".complete").exists():
            shutil.rmtree(folder, ignore_errors=True)
            for c in range(CLASSES):
                (folder / f"class{c}").mkdir(parents=True)
                for i in range(n // CLASSES):
                    os.link(every / f"class{c}" / f"{i:07d}.jpg", folder / f"class{c}" / f"{i:07d}.jpg")
            (folder / ".complete").write_text("")
        out[n] = folder
    return out


# ------------------------------------------------------------------------------ in the child

class Sampler:
    """Peak anonymous memory of this process (RssAnon) and of it plus its child processes (DataLoader workers),
    sampled every 50 ms. The total sums ``Pss_Anon`` (smaps_rollup): a forked worker's copy-on-write pages
    shared with its parent count once, not once per process."""

    def __init__(self) -> None:
        self.peak_self = self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _anon(pid: int | str) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    @staticmethod
    def _pss_anon(pid: int | str) -> int:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss_Anon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    @staticmethod
    def _children() -> list[str]:
        pid = os.getpid()
        kids = []
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                kids += Path(f"/proc/{pid}/task/{task}/children").read_text().split()
            except OSError:
                pass
        return kids

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_self = max(self.peak_self, self._anon("self"))
            self.peak_total = max(self.peak_total, self._pss_anon("self") + sum(self._pss_anon(k) for k in self._children()))
            time.sleep(0.05)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        hwm = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
        return {"peak_anon": self.peak_self, "peak_anon_total": max(self.peak_total, self.peak_self), "vm_hwm": hwm}


def _imclass(folder: str, size: int):
    from imclass.data.folder import folder_decoder, folder_images

    return folder_images(folder, "all"), folder_decoder((size, size))


def _epoch(loader_batches) -> int:
    n = 0
    for batch in loader_batches:
        n += len(batch[0])
    return n


def _tv_loader(folder: str, size: int, workers: int, batch: int):
    import torch
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize((size, size), antialias=True), transforms.PILToTensor()])
    ds = datasets.ImageFolder(folder, transform=tf)
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                                       persistent_workers=False, generator=torch.Generator().manual_seed(0))


def child(task: str, folder: str, size: int, workers: int, batch: int, cache_dir: str, rounds: int) -> dict:
    """One measurement in this (fresh) process; returns its figures."""
    import torch

    torch.set_num_threads(1)
    from imclass.data.source import open_images

    sampler = Sampler()
    start = time.perf_counter()
    out: dict = {"task": task}
    if task == "memory":
        files, decoder = _imclass(folder, size)
        src = open_images(files, decoder, "memory", workers=workers, verbose=False)
        out["images"] = len(src)
    elif task == "cache_build":
        shutil.rmtree(cache_dir, ignore_errors=True)
        files, decoder = _imclass(folder, size)
        src = open_images(files, decoder, "cache", cache_dir=cache_dir, workers=workers, verbose=False)
        out["images"] = len(src)
    elif task == "cache_warm":
        # start-up: listing the folder (one stat per file), the cache key, mapping the cache and the first
        # batch in hand; the interpreter and ``import torch`` before it are constant in N (import_s)
        t0 = time.perf_counter()
        files, decoder = _imclass(folder, size)
        out["listing_s"] = time.perf_counter() - t0
        src = open_images(files, decoder, "cache", cache_dir=cache_dir, workers=workers, verbose=False)
        batches = iter(src.loader(batch, shuffle=True, seed=0, stage=False).batches(0))
        seen = len(next(batches)[0])
        t1 = time.perf_counter()
        out["startup_s"] = t1 - t0
        out["import_s"] = t0 - T_START
        seen += _epoch(batches)
        out["images"] = seen
        out["epoch_s"] = time.perf_counter() - t1  # the rest of the epoch
    elif task == "stream":
        files, decoder = _imclass(folder, size)
        src = open_images(files, decoder, "stream", workers=workers, verbose=False)
        out["images"] = _epoch(src.loader(batch, shuffle=True, seed=0).batches(0))
    elif task == "torchvision":
        out["images"] = _epoch(_tv_loader(folder, size, workers, batch))
    elif task == "rounds":
        files, decoder = _imclass(folder, size)
        stream = open_images(files, decoder, "stream", workers=workers, verbose=False)

        def build():
            shutil.rmtree(cache_dir, ignore_errors=True)
            return len(open_images(files, decoder, "cache", cache_dir=cache_dir, workers=workers, verbose=False))

        tv = lambda: _epoch(_tv_loader(folder, size, workers, batch))  # noqa: E731
        out["stream_vs_torchvision"] = host.interleave(
            {"stream": lambda: _epoch(stream.loader(batch, shuffle=True, seed=0).batches(0)), "torchvision": tv}, rounds)
        out["cache_build_vs_torchvision"] = host.interleave({"cache_build": build, "torchvision": tv}, rounds)
        cache = open_images(files, decoder, "cache", cache_dir=cache_dir, workers=workers, verbose=False)
        out["warm_cache_vs_torchvision"] = host.interleave(
            {"warm_cache": lambda: _epoch(cache.loader(batch, shuffle=True, seed=0, stage=False).batches(0)),
             "torchvision": tv}, rounds)
        n = len(files)
        for key, part in out.items():
            if isinstance(part, dict):
                for side in part.values():
                    side["images_per_s"] = {"median": n / side["median"], "min": n / side["max"], "max": n / side["min"]}
    else:
        raise ValueError(f"unknown task {task!r}")
    out["seconds"] = time.perf_counter() - start
    out |= sampler.stop()
    return out


# ------------------------------------------------------------------------------ the parent

def run_child(args: argparse.Namespace, task: str, folder: Path, cache_dir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", task, "--folder", str(folder),
           "--image-size", str(args.image_size), "--workers", str(args.workers), "--batch", str(args.batch),
           "--cache-dir", str(cache_dir), "--rounds", str(args.rounds)]
    env = host.clean_env({**os.environ, "OMP_NUM_THREADS": "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{task} on {folder} failed: {done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _median_child(runs: list[dict]) -> dict:
    """One figure from repeated warm starts: the run of median peak anonymous memory, with the median start-up
    and listing times and every run's figures under ``"rounds"`` (the peak moves by tens of MB between identical
    runs: where glibc puts each 12 MB batch)."""
    keys = ("peak_anon_total", "startup_s", "listing_s")
    chosen = dict(sorted(runs, key=lambda r: r["peak_anon_total"])[(len(runs) - 1) // 2])
    chosen["rounds"] = {key: [r[key] for r in runs] for key in keys}
    chosen.update({key: statistics.median(values) for key, values in chosen["rounds"].items()})
    return chosen


def goals(result: dict) -> dict:
    """Each goal of issue 26 checked against the figures: {goal: {"value", "ok"}}."""
    per_n = result["per_n"]
    out = {}
    peaks = {t: [per_n[n][t]["peak_anon_total"] for n in per_n if t in per_n[n]] for t in ("cache_warm", "stream")}
    for t, values in peaks.items():
        if values:
            out[f"{t} peak anon <= 1.5 GB"] = {"value": _gb(max(values)), "ok": max(values) <= 1.5e9}
            out[f"{t} peak anon flat (largest / smallest N <= 1.25)"] = {
                "value": f"{max(values) / max(1, min(values)):.2f}x", "ok": max(values) <= 1.25 * min(values)}
    starts = [per_n[n]["cache_warm"]["startup_s"] for n in per_n if "cache_warm" in per_n[n]]
    if starts:
        out["start-up on an existing cache < 1 s"] = {"value": f"{max(starts):.2f} s", "ok": max(starts) < 1}
    r = result.get("rounds")
    if r:
        tv = r["cache_build_vs_torchvision"]["torchvision"]["median"]
        build = r["cache_build_vs_torchvision"]["cache_build"]["median"]
        out["cache build >= 0.9x torchvision"] = {"value": f"{tv / build:.2f}x", "ok": tv / build >= 0.9}
        warm = r["warm_cache_vs_torchvision"]["warm_cache"]["median"]
        tv2 = r["warm_cache_vs_torchvision"]["torchvision"]["median"]
        out["warm-cache epoch >= 20x torchvision"] = {"value": f"{tv2 / warm:.1f}x", "ok": tv2 / warm >= 20}
        st = r["stream_vs_torchvision"]["stream"]["median"]
        tv3 = r["stream_vs_torchvision"]["torchvision"]["median"]
        out["stream within 10 % of torchvision"] = {"value": f"{tv3 / st:.2f}x", "ok": tv3 / st >= 0.9}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="5000,20000,100000", help="Numbers of photos (comma-separated).")
    p.add_argument("--root", default="/tmp/imclass_data_scale", help="Where the photos (and caches) go.")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=2, help="Decoding workers (threads or DataLoader processes), both sides.")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tiers", default="memory,cache,stream,torchvision")
    p.add_argument("--out", default=str(HERE / "data_scale.json"))
    p.add_argument("--generate-only", action="store_true", help="Only generate the photos (before the quiet window).")
    p.add_argument("--no-guard", action="store_true", help="Record the load but do not refuse busy figures (trials).")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--folder", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.image_size, args.workers, args.batch, args.cache_dir,
                               args.rounds)))
        return
    host.full_strength_blas()  # before numpy: the peer and imclass at full strength
    sizes = sorted(int(s) for s in args.sizes.split(","))
    tiers = args.tiers.split(",")
    root = Path(args.root)
    t0 = time.perf_counter()
    folders = make_photos(root, sizes, max(1, os.cpu_count() or 1))
    print(f"photos ready in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.generate_only:
        return
    guard = host.LoadGuard(cores=args.workers + 1, strict=not args.no_guard)  # the load of the measurement only
    t0 = time.perf_counter()
    result: dict = {"sizes": sizes, "image_size": args.image_size, "workers": args.workers, "batch": args.batch,
                    "photo": {"width": PHOTO[0], "height": PHOTO[1], "classes": CLASSES}, "per_n": {}}
    for n in sizes:
        cache_dir = root / f"cache-n{n}"
        part: dict = {}
        steps = (["memory"] if "memory" in tiers else []) + (["cache_build", "cache_warm"] if "cache" in tiers else []) \
            + (["stream"] if "stream" in tiers else []) + (["torchvision"] if "torchvision" in tiers else [])
        for task in steps:
            if task == "cache_warm":
                part[task] = _median_child([run_child(args, task, folders[n], cache_dir) for _ in range(args.rounds)])
            else:
                part[task] = run_child(args, task, folders[n], cache_dir)
            f = part[task]
            print(f"N={n:>7,} {task:<12} {f['seconds']:8.1f} s  peak anon {_gb(f['peak_anon'])} "
                  f"(with workers, PSS {_gb(f['peak_anon_total'])})  VmHWM {_gb(f['vm_hwm'])}"
                  + (f"  start-up {f['startup_s']:.2f} s (listing {f['listing_s']:.2f} s; imports before it "
                     f"{f['import_s']:.1f} s), epoch {f['epoch_s']:.1f} s" if "startup_s" in f else ""),
                  flush=True)
        shutil.rmtree(cache_dir, ignore_errors=True)
        result["per_n"][n] = part
    smallest = sizes[0]
    result["rounds"] = run_child(args, "rounds", folders[smallest], root / "cache-rounds")
    result["rounds"]["n"] = smallest
    shutil.rmtree(root / "cache-rounds", ignore_errors=True)
    for key in ("stream_vs_torchvision", "cache_build_vs_torchvision", "warm_cache_vs_torchvision"):
        sides = result["rounds"][key]
        print(f"N={smallest:,} {key}: " + ", ".join(
            f"{name} {s['images_per_s']['median']:.0f} img/s ({s['images_per_s']['min']:.0f}-{s['images_per_s']['max']:.0f})"
            for name, s in sides.items()), flush=True)
    # the children measured; import their libraries here too so that the provenance lists their versions
    # and BLAS kernels (each child runs with OMP_NUM_THREADS=1 and torch.set_num_threads(1))
    import numpy  # noqa: F401
    import PIL  # noqa: F401
    import torch  # noqa: F401
    import torchvision  # noqa: F401

    result["child_threads"] = {"torch": 1, "OMP_NUM_THREADS": 1, "decode_workers": args.workers}
    result["goals"] = goals(result)
    for goal, v in result["goals"].items():
        print(f"  {'ok  ' if v['ok'] else 'MISS'} {goal}: {v['value']}")
    result["seconds"] = time.perf_counter() - t0
    host.write_result(args.out, result, guard=guard)
    print(f"wrote {args.out} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
