"""The data tiers (imclass.data.source): the chooser against real memory limits, the memory-mapped
cache (identical pixels, invalidation, killed builds, bounded memory) and the loaders over it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import imclass.data as imdata
from imclass.data.folder import folder_decoder, folder_images
from imclass.data.loader import TensorLoader
from imclass.data.source import (
    MemoryBudget,
    _cgroup_limits,
    build_cache,
    choose_mode,
    find_cache,
    memory_budget,
)

ROOT = Path(__file__).resolve().parent.parent


def _photos(folder: Path, per_class: int, classes: int = 3, size: tuple[int, int] = (30, 40), seed: int = 0) -> Path:
    """A class-per-folder tree of smooth noisy JPEGs (and one grey PNG per class), each class its own colours."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[0], 0 : size[1]] / max(size)
    for c in range(classes):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = np.array([80 + 60 * c, 200 - 50 * c, 120], dtype=float)
            img = base + 100 * (xx if c % 2 else yy)[..., None] + rng.normal(0, 20, (*size, 3))
            img = np.clip(img, 0, 255).astype(np.uint8)
            if i == 0:
                Image.fromarray(img.mean(2).astype(np.uint8)).save(folder / f"c{c}" / f"{i:04d}.png")
            else:
                Image.fromarray(img).save(folder / f"c{c}" / f"{i:04d}.jpg", quality=90)
    return folder


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("IMCLASS_CACHE", str(tmp_path / "state"))
    return tmp_path / "state" / "images"


# --------------------------------------------------------------------------------------------
# the chooser


def test_choose_mode_from_sizes_against_the_budget(tmp_path):
    budget = MemoryBudget(1_000_000_000, "test")
    assert choose_mode(1000, (3, 64, 64), budget=budget, cache_dir=tmp_path).mode == "memory"  # 12 MB of 1 GB
    big = choose_mode(30_000, (3, 128, 128), budget=budget, cache_dir=tmp_path)  # 1.47 GB of 1 GB
    assert big.mode == "cache" and big.stored_bytes == 30_000 * 3 * 128 * 128
    assert "30,000 images of 3x128x128 = 1.47 GB" in big.line() and "-> cache tier" in big.line()
    forced = choose_mode(10, (3, 8, 8), "stream", budget=budget)
    assert forced.mode == "stream" and "asked for" in forced.line()
    with pytest.raises(ValueError, match="memory, cache or stream"):
        choose_mode(10, (3, 8, 8), "disk")


def test_the_chooser_keeps_room_for_the_model_beside_the_images(tmp_path):
    from imclass.data.source import ACTIVATION_RESERVE, DEFAULT_MODEL_BYTES, RESERVE_FACTOR, model_reserve

    net = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.BatchNorm1d(1000))  # 1,003,000 params + 2,001 buffers
    weights = (1000 * 1000 + 1000 + 2 * 1000) * 4 + (2 * 1000) * 4 + 8  # float32 params, running mean/var, int64 count
    assert model_reserve(net) == RESERVE_FACTOR * weights + ACTIVATION_RESERVE
    assert model_reserve() == RESERVE_FACTOR * DEFAULT_MODEL_BYTES + ACTIVATION_RESERVE == 512 << 20
    budget = MemoryBudget(2_000_000_000, "test")
    shape = (3, 100, 100)  # 30 KB an image: 20,000 images = 600 MB
    assert choose_mode(20_000, shape, budget=budget, cache_dir=tmp_path, reserve=0).mode == "memory"  # 600 MB <= 1 GB
    beside = choose_mode(20_000, shape, budget=budget, cache_dir=tmp_path)  # the default reserve: 0.5 x (2 GB - 512 MiB)
    assert beside.mode == "memory" and beside.reserve == 512 << 20 and "0.54 GB of it kept for the model" in beside.line()
    big = torch.nn.Linear(10_000, 10_000)  # 400 MB of float32 weights: x4 + 256 MiB = 1.87 GB kept
    assert choose_mode(20_000, shape, budget=budget, cache_dir=tmp_path, reserve=model_reserve(big)).mode == "cache"
    assert choose_mode(20_000, shape, "memory", budget=budget, reserve=model_reserve(big)).mode == "memory"  # asked for


def test_cgroup_limits_v1_and_v2_are_read_from_the_process_group(tmp_path):
    v2 = tmp_path / "v2"
    (v2 / "job" / "inner").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("memory\n")
    (v2 / "job" / "memory.max").write_text(f"{2 << 30}\n")
    (v2 / "job" / "memory.stat").write_text(f"anon {100 << 20}\nfile {900 << 20}\n")
    (v2 / "job" / "inner" / "memory.max").write_text("max\n")
    proc = tmp_path / "cgroup2"
    proc.write_text("0::/job/inner\n")
    assert _cgroup_limits(proc, v2) == {"cgroup v2 memory.max": (2 << 30) - (100 << 20)}  # the parent's limit counts

    v1 = tmp_path / "v1"
    (v1 / "memory" / "box").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # "no limit"
    (v1 / "memory" / "box" / "memory.limit_in_bytes").write_text(f"{1 << 30}\n")
    (v1 / "memory" / "box" / "memory.stat").write_text(f"cache {500 << 20}\nrss 0\ntotal_rss {200 << 20}\n")
    proc = tmp_path / "cgroup1"
    proc.write_text("5:cpu:/\n4:memory:/box\n")
    assert _cgroup_limits(proc, v1) == {"cgroup v1 memory.limit_in_bytes": (1 << 30) - (200 << 20)}


def _child(code: str, timeout: float = 120, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def test_the_chooser_reads_rlimit_as_in_a_child_process():
    done = _child("""
        import json, resource
        from imclass.data.source import choose_mode, memory_budget, _proc_status
        free = memory_budget()
        size = _proc_status("VmSize") + (400 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
        limited = memory_budget()
        print(json.dumps({"free": [free.source, free.bytes], "limited": [limited.source, limited.bytes],
                          "mode": choose_mode(5000, (3, 128, 128), budget=limited).mode,
                          "free_mode": choose_mode(5000, (3, 128, 128), budget=free).mode}))
    """)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["limited"][0] == "RLIMIT_AS" and 300 << 20 < out["limited"][1] <= 400 << 20
    assert out["free"][0] != "RLIMIT_AS"
    assert out["mode"] == "cache" and out["free_mode"] == "memory"  # 246 MB: too much for 400 MB, little for the host


def _cgroup_root() -> Path | None:
    for base, limit in ((Path("/sys/fs/cgroup/memory"), "memory.limit_in_bytes"), (Path("/sys/fs/cgroup"), "memory.max")):
        if (base / limit).exists() or (base / "cgroup.controllers").exists():
            if os.access(base, os.W_OK):
                return base
    return None


def test_the_chooser_reads_a_real_cgroup_memory_limit():
    base = _cgroup_root()
    if base is None or os.geteuid() != 0:
        pytest.skip("no writable cgroup memory controller here (needs root)")
    group = base / f"imclass-test-{os.getpid()}"
    try:
        group.mkdir()
    except OSError as err:
        pytest.skip(f"cannot create a cgroup under {base}: {err}")
    try:
        v1 = (group / "memory.limit_in_bytes").exists()
        (group / ("memory.limit_in_bytes" if v1 else "memory.max")).write_text(str(1 << 30))
        done = _child(f"""
            import json, os
            with open("{group}/cgroup.procs", "w") as f:
                f.write(str(os.getpid()))
            from imclass.data.source import memory_budget
            b = memory_budget()
            print(json.dumps([b.source, b.bytes]))
        """)
        assert done.returncode == 0, done.stderr
        source, available = json.loads(done.stdout.strip().splitlines()[-1])
        assert source.startswith("cgroup v1" if v1 else "cgroup v2")
        assert 0 < available <= 1 << 30
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


# --------------------------------------------------------------------------------------------
# the cache


def test_the_three_tiers_hold_the_same_pixels_and_train_to_the_same_predictions(tmp_path, cache_env, one_thread):
    folder = _photos(tmp_path / "photos", 8)
    memory = imdata.load(folder, split="train", image_size=16, mode="memory")
    cached = imdata.load(folder, split="train", image_size=16, mode="cache")
    assert (memory.mode, cached.mode) == ("memory", "cache")
    assert torch.equal(memory.images, cached.images) and torch.equal(memory.labels, cached.labels)
    assert memory.image_shape == (3, 16, 16)  # grey PNGs among colour JPEGs: RGB
    again = imdata.load(folder, split="train", image_size=16)  # no mode: the existing cache is used
    assert again.mode == "cache" and torch.equal(again.images, memory.images)

    from imclass import models
    from imclass.train import Classifier

    stream = imdata.load(folder, split="train", image_size=16, mode="stream")
    assert stream.mode == "stream" and torch.equal(stream.read(torch.arange(len(stream))), memory.images)
    preds = []
    for ds in (memory, cached, stream):
        torch.manual_seed(0)
        clf = Classifier(models.create("mlp", num_classes=3, in_chans=3, img_size=16), device="cpu").compile("adam")
        clf.fit(ds, epochs=2, batch_size=4, seed=0, verbose=False, validation=0.25)
        preds.append((clf.predict_logits(ds), clf.history.history["val_accuracy"]))
    for other in preds[1:]:  # bit for bit: the same batches, statistics, dropout draws and validation rows
        assert torch.equal(preds[0][0], other[0]) and preds[0][1] == other[1]


def test_cache_is_invalidated_by_any_change(tmp_path, cache_env):
    folder = _photos(tmp_path / "photos", 4)

    def key_of(size=16):
        return find_cache(folder_images(folder, "all"), folder_decoder((size, size)))

    imdata.load(folder, split="all", image_size=16, mode="cache")
    first = key_of()
    assert first is not None and key_of(24) is None  # another size: another cache
    victim = folder / "c1" / "0002.jpg"
    st = victim.stat()
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched
    assert key_of() is None
    ds = imdata.load(folder, split="all", image_size=16, mode="cache")
    assert key_of() not in (None, first)
    Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / "c1" / "new.jpg")  # added
    assert key_of() is None
    grown = imdata.load(folder, split="all", image_size=16, mode="cache")
    assert len(grown) == len(ds) + 1
    victim.unlink()  # removed
    assert key_of() is None
    assert len(imdata.load(folder, split="all", image_size=16, mode="cache")) == len(ds)


def test_the_cache_key_is_the_digest_of_every_file_line_whatever_the_chunk(tmp_path, monkeypatch):
    """The key hashes one line per file (path, size, mtime, label) a chunk at a time, so that the text of a
    100,000-file key is never held at once (93 MB of anonymous memory it kept before): the digest is the
    sha256 of all the lines in one piece, whatever the chunk size."""
    import hashlib

    import imclass.data.source as source

    images = folder_images(_photos(tmp_path / "photos", 5), "all")
    decoder = folder_decoder((16, 16))
    whole = source.cache_key(images, decoder)
    monkeypatch.setattr(source, "_KEY_CHUNK", 2)
    assert source.cache_key(images, decoder) == whole
    head = {"v": source._CACHE_VERSION, "decoder": decoder.key, "size": [16, 16], "channels": decoder.channels,
            "classes": images.classes}
    lines = "".join(f"{t}\0{size}\0{mtime}\0{y}\n" for (t, size, mtime), y in zip(images.stats, images.labels))
    expected = hashlib.sha256(json.dumps(head, sort_keys=True).encode() + lines.encode()).hexdigest()[:32]
    assert whole == expected and len(images) == len(images.stats) > 2


def test_a_warm_start_stats_each_file_once_and_decodes_nothing(tmp_path, cache_env, monkeypatch):
    """Start-up on an existing cache: listing the folder, the cache key and mapping the cache take one
    stat per image file, no open of any image file and no decode; a plain (unsplit) copy of the key
    (each file stat'ed here) is the same key, so the walk's stats are the files' own."""
    import builtins

    import imclass.data.source as source

    folder = _photos(tmp_path / "photos", 12)
    imdata.load(folder, split="train", image_size=16, mode="cache", verbose=False)  # builds it
    files = {str(p) for p in folder.rglob("*") if p.is_file()}
    stats: list[str] = []
    opened: list[str] = []
    real_stat, real_open = os.stat, builtins.open

    def counting_stat(path, *args, dir_fd=None, **kwargs):
        # the walk stats each name relative to its open folder (dir_fd): name the file it reaches
        full = os.fspath(path) if dir_fd is None else os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        if full in files:
            stats.append(full)
        return real_stat(path, *args, dir_fd=dir_fd, **kwargs)

    def counting_open(path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and os.fspath(path) in files:
            opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    def no_decode(*args, **kwargs):
        raise AssertionError("an image was decoded on a warm start")

    monkeypatch.setattr(os, "stat", counting_stat)
    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr("imclass.data.folder.decode_array", no_decode)
    monkeypatch.setattr("imclass.data.folder.probe_image", no_decode)
    warm = imdata.load(folder, split="train", image_size=16, mode=None, verbose=False)  # the chooser finds the cache
    first = next(iter(warm.loader(8, shuffle=True, seed=0).batches(0)))
    assert warm.mode == "cache" and len(first[0]) == 8
    assert len(stats) == len(files) and set(stats) == files  # every file of the tree once (the walk)
    assert opened == []
    monkeypatch.setattr(os, "stat", real_stat)
    listed = folder_images(folder, "train")
    plain = source.ImageList(listed.paths, listed.labels, listed.classes, listed.root)  # no stats: stat'ed by cache_key
    assert source.cache_key(plain, folder_decoder((16, 16))) == source.cache_key(listed, folder_decoder((16, 16)))


def test_a_killed_build_leaves_no_readable_cache(tmp_path, cache_env):
    folder = _photos(tmp_path / "photos", 20)
    job = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from imclass.data.folder import folder_decoder, folder_images
        from imclass.data.source import Decoder, build_cache
        plain = folder_decoder((16, 16))
        def slow(path):
            time.sleep(0.05)
            return plain.fn(path)
        build_cache(folder_images({str(folder)!r}, "all"), Decoder(slow, plain.size, plain.key, None, plain.grey_probe),
                    workers=1, verbose=False)
    """)], env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not list(cache_env.glob(".*.tmp-*")) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # mid-build: some rows written
        assert job.poll() is None, job.stderr.read().decode()
    finally:
        job.send_signal(signal.SIGKILL)
        job.wait()
    assert list(cache_env.glob(".*.tmp-*")), "the build should have been killed while writing"
    images, decoder = folder_images(folder, "all"), folder_decoder((16, 16))
    assert find_cache(images, decoder) is None and not list(cache_env.glob("*.json"))
    cached = imdata.load(folder, split="all", image_size=16, mode="cache")  # builds afresh, removes the leftover
    memory = imdata.load(folder, split="all", image_size=16, mode="memory")
    assert torch.equal(cached.images, memory.images)
    assert not list(cache_env.glob(".*.tmp-*"))


_PEAK = """
    import json, sys
    import imclass.data as imdata
    from imclass.train.inputs import channel_stats

    def anon():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    mode = sys.argv[2]
    before = anon()
    ds = imdata.load(sys.argv[1], split="all", image_size=192, mode=mode, verbose=False)
    loader = ds.loader(64, seed=0)
    total = 0
    for epoch in range(2):
        for x, y in loader.batches(epoch):
            total += int(x[:, 0, 0, 0].sum())
    channel_stats(ds.images)
    print(json.dumps({"grown": anon() - before, "stored": ds.nbytes, "n": len(ds)}))
"""


def test_cache_tier_anonymous_memory_does_not_grow_with_the_number_of_images(tmp_path, cache_env):
    small = _photos(tmp_path / "small", 100, size=(24, 24))
    large = _photos(tmp_path / "large", 400, size=(24, 24))
    script = tmp_path / "peak.py"
    script.write_text(textwrap.dedent(_PEAK))
    # a fixed malloc threshold: freed batches go back to the system, so RssAnon is what the process holds,
    # not what glibc's growing heap happens to keep (its dynamic threshold made the figure wander)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072",
           "MALLOC_TRIM_THRESHOLD_": "131072"}

    def run(folder: Path, mode: str) -> dict:
        done = subprocess.run([sys.executable, str(script), str(folder), mode], capture_output=True, text=True,
                              env=env, timeout=180)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    c_small, c_large = run(small, "cache"), run(large, "cache")
    m_small = run(small, "memory")
    extra = c_large["stored"] - c_small["stored"]  # 900 more images of 3x192x192: 99.5 MB more pixels
    assert c_large["n"] == 1200 and extra > 99e6
    assert m_small["grown"] > 0.9 * m_small["stored"]  # the measure sees the pixels when they are in memory
    figures = {"cache small": c_small, "cache large": c_large, "memory small": m_small}
    assert c_large["grown"] - c_small["grown"] < 0.2 * extra, figures  # ... and the cache tier does not hold them
    assert c_large["grown"] < 0.2 * c_large["stored"] + 40e6, figures


# --------------------------------------------------------------------------------------------
# the loaders


def test_loader_rows_and_unstaged_gathers_match_a_copied_subset():
    images = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(50) % 7
    rows = torch.tensor(sorted(torch.randperm(50, generator=torch.Generator().manual_seed(1))[:37].tolist()))
    copied = TensorLoader(images[rows], labels[rows], 8, seed=3, rank=1, world_size=2)
    viewed = TensorLoader(images, labels, 8, seed=3, rank=1, world_size=2, rows=rows, stage=False)
    assert len(copied) == len(viewed)
    for (i1, x1, y1), (i2, x2, y2) in zip(copied.indexed_batches(2), viewed.indexed_batches(2)):
        assert torch.equal(i1, i2) and torch.equal(x1, x2) and torch.equal(y1, y2)


def test_limit_is_applied_to_the_files_before_decoding_in_every_tier(tmp_path, cache_env):
    folder = _photos(tmp_path / "photos", 10)
    whole = imdata.load(folder, split="all", image_size=8, mode="memory", verbose=False)
    part = imdata.load(folder, split="all", image_size=8, mode="cache", limit=7, seed=2, verbose=False)
    pick = imdata.split.limit_indices(whole.labels, 7, seed=2)
    assert torch.equal(part.images, whole.images[pick]) and torch.equal(part.labels, whole.labels[pick])
    assert part.mode == "cache" and len(part) == 7


def test_cli_data_cache_then_train_reads_it_and_reports_the_mode(tmp_path, cache_env, one_thread):
    from typer.testing import CliRunner

    from imclass.cli import app

    folder = _photos(tmp_path / "photos", 10)
    runner = CliRunner()
    built = runner.invoke(app, ["data", "cache", str(folder), "--image-size", "16", "--json"])
    assert built.exit_code == 0, built.output
    rows = json.loads(built.stdout.strip().splitlines()[-1])["splits"]
    assert [r["split"] for r in rows] == ["train", "test"] and sum(r["images"] for r in rows) == 30
    done = runner.invoke(app, ["train", "--model", "mlp", "--dataset", str(folder), "--image-size", "16", "--epochs", "1",
                               "--out", str(tmp_path / "run"), "--json"])
    assert done.exit_code == 0, done.output
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["data_mode"] == "cache" and 0 <= result["accuracy"] <= 1 and result["seconds"] > 0
    assert "-> cache tier (an existing cache)" in done.stderr
    cleared = runner.invoke(app, ["data", "cache", "--clear"])
    assert cleared.exit_code == 0 and not list(cache_env.glob("*.npy"))


def test_evaluate_predict_and_features_read_every_tier_alike(tmp_path, cache_env, one_thread):
    from typer.testing import CliRunner

    from imclass.cli import app

    folder = _photos(tmp_path / "photos", 10)
    runner = CliRunner()
    run = tmp_path / "run"
    done = runner.invoke(app, ["train", "--model", "keras_cnn", "--dataset", str(folder), "--image-size", "16",
                               "--epochs", "1", "--out", str(run), "--json", "--data-mode", "memory"])
    assert done.exit_code == 0, done.output

    def last_json(args):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.strip().splitlines()[-1])

    ev = {m: last_json(["evaluate", str(run), str(folder), "--json", "--data-mode", m]) for m in ("memory", "cache")}
    assert ev["cache"]["data_mode"] == "cache" and ev["memory"]["data_mode"] == "memory"
    assert ev["cache"]["accuracy"] == ev["memory"]["accuracy"] and ev["cache"]["loss"] == ev["memory"]["loss"]
    pred = {m: last_json(["predict", str(run), str(folder), "--json", "--top", "2", "--data-mode", m])
            for m in ("stream", "cache")}
    assert pred["cache"]["predictions"] == pred["stream"]["predictions"] and len(pred["cache"]["predictions"]) == 30
    feats = {}
    for m in ("memory", "cache"):
        out = tmp_path / f"{m}.npz"
        result = runner.invoke(app, ["features", str(run), str(folder), "--out", str(out), "--cache", "none",
                                     "--data-mode", m])
        assert result.exit_code == 0, result.output
        feats[m] = np.load(out)["features"]
    assert feats["memory"].shape[0] == 30 and np.array_equal(feats["memory"], feats["cache"])
