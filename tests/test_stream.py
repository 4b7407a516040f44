"""The stream tier (DataLoader workers over files or WebDataset shards) and ``imclass data shard``:
shards read back identically (the ``webdataset`` library as the oracle), the file stream gives the
in-memory loader's batches bit for bit, ranks x workers read disjoint shards, memory stays flat as
the folder grows, and 2 gloo processes under torchrun read disjoint files and shards."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from imclass.data import shards as sh
from imclass.data.decode import decode_array
from imclass.data.folder import folder_decoder, folder_images
from imclass.data.loader import TensorLoader
from imclass.data.source import open_images
from imclass.data.shards import ShardSource
from imclass.data.stream import StreamSource

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ("airplane", "cat", "ship")


@pytest.fixture(scope="module")
def photos(tmp_path_factory, cifar_npz) -> Path:
    """A plain tree of real CIFAR-10 photos: 3 classes x 40 JPEGs (48x40) and one grey PNG each."""
    root = tmp_path_factory.mktemp("stream") / "photos"
    for name, label in zip(CLASSES, (0, 3, 8)):
        folder = root / name
        folder.mkdir(parents=True)
        idx = np.flatnonzero(cifar_npz["y_train"] == label)[:40]
        for k, i in enumerate(idx):
            im = Image.fromarray(cifar_npz["x_train"][i]).resize((48, 40), Image.BILINEAR)
            if k == 0:
                im.convert("L").save(folder / f"{k:03d}.png")
            else:
                im.save(folder / f"{k:03d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def shard_dir(photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "set"
    sh.write_shards(photos, out, image_size=32, shard_size="12", verbose=False)
    return out


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_shards_hold_the_files_bytes_and_labels(photos, tmp_path):
    """Without --image-size each sample is the file's own bytes: the shards' (bytes, label) multiset equals the
    folder's per split (the split load() makes of a plain tree), read by webdataset and by imclass alike."""
    import webdataset as wds

    out = tmp_path / "raw"
    index = sh.write_shards(photos, out, shard_size="50", verbose=False)
    shard_set = sh.ShardSet(out)
    assert index["classes"] == list(CLASSES) and shard_set.splits == ["train", "test"]
    exts = set()
    for split in ("train", "test"):
        files = folder_images(photos, split)
        expected = Counter((_sha(Path(p).read_bytes()), y) for p, y in zip(files.paths, files.labels))
        ours = list(shard_set.samples(split))
        assert Counter((_sha(s.data), s.label) for s in ours) == expected
        theirs = list(wds.WebDataset([str(p) for p in shard_set.shards(split)], shardshuffle=False))
        assert [(t["__key__"], _sha(t[s.ext]), int(t["cls"])) for t, s in zip(theirs, ours)] == \
               [(s.key, _sha(s.data), s.label) for s in ours]
        assert len(theirs) == len(ours) == index["splits"][split]["count"] == len(files)
        assert shard_set.labels(split).tolist() == [s.label for s in ours]
        assert index["splits"][split]["class_counts"] == np.bincount(files.labels, minlength=3).tolist()
        exts |= {s.ext for s in ours}
    assert exts == {"jpg", "png"}  # each file keeps its format
    assert [s["count"] for s in index["splits"]["train"]["shards"]] == [50, 46]


def test_resized_shards_decode_like_the_files(photos, shard_dir):
    """--image-size 32 re-encodes: the samples are exactly the files decoded at 32x32 through the gate and saved
    as JPEG (quality 90; the grey PNGs as PNG), and the webdataset library reads the same bytes and labels."""
    import io

    import webdataset as wds

    shard_set = sh.ShardSet(shard_dir)
    assert shard_set.counts("train") == [12] * 8 and shard_set.index["image_size"] == [32, 32]
    files = folder_images(photos, "train")
    expected = Counter()
    for p, y in zip(files.paths, files.labels):
        buf = io.BytesIO()
        png = Path(p).suffix == ".png"
        Image.fromarray(decode_array(p, size=(32, 32))).save(buf, format="PNG" if png else "JPEG",
                                                            **({} if png else {"quality": 90}))
        expected[(_sha(buf.getvalue()), y, "png" if png else "jpg")] += 1
    ours = list(shard_set.samples("train"))
    assert Counter((_sha(s.data), s.label, s.ext) for s in ours) == expected
    theirs = list(wds.WebDataset([str(p) for p in shard_set.shards("train")], shardshuffle=False))
    assert [(t["__key__"], t[s.ext], int(t["cls"])) for t, s in zip(theirs, ours)] == [(s.key, s.data, s.label) for s in ours]
    assert len(theirs) == 96 and decode_array(ours[0].data).shape[:2] == (32, 32)


def test_shard_writing_is_atomic(photos, tmp_path, monkeypatch):
    """A run killed half-way leaves neither the output folder nor its hidden partial folder; an existing
    --out is refused; the CLI writes the set and prints the index."""
    from imclass.cli import data as data_cli

    calls = {"n": 0}
    real = sh._encode

    def dies(*args):
        calls["n"] += 1
        if calls["n"] == 30:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(sh, "_encode", dies)
    with pytest.raises(KeyboardInterrupt):
        sh.write_shards(photos, tmp_path / "killed", shard_size="10", workers=1, verbose=False)
    assert sorted(os.listdir(tmp_path)) == []
    monkeypatch.setattr(sh, "_encode", real)
    app = typer.Typer()
    data_cli.register(app)
    app.callback()(lambda: None)
    result = CliRunner().invoke(app, ["data", "shard", str(photos), "--out", str(tmp_path / "s"), "--image-size",
                                      "16", "--shard-size", "1MB", "--json"])
    assert result.exit_code == 0, result.output
    index = json.loads(result.stdout)
    assert index["image_size"] == [16, 16] and index["splits"]["train"]["count"] == 96
    assert len(index["splits"]["train"]["shards"]) == 1
    again = CliRunner().invoke(app, ["data", "shard", str(photos), "--out", str(tmp_path / "s")])
    assert again.exit_code == 2 and "exists already" in again.output
    with pytest.raises(ValueError, match="expected --shard-size as a number of images"):
        sh.parse_shard_size("12 parsecs")


def test_file_stream_gives_the_memory_loaders_batches(photos):
    """The stream tier over files yields the in-memory TensorLoader's batches bit for bit (2 worker processes),
    for one process and for each of 2 ranks, whose positions are disjoint and cover every image."""
    files, decoder = folder_images(photos, "train"), folder_decoder((32, 32))
    memory = open_images(files, decoder, "memory", verbose=False)
    stream = open_images(files, decoder, "stream", workers=2, verbose=False)
    assert isinstance(stream, StreamSource) and stream.mode == "stream"
    assert stream.image_shape == tuple(memory.images.shape[1:]) == (3, 32, 32)
    assert torch.equal(stream.read(torch.tensor([5, 0, 77])), memory.images[[5, 0, 77]])
    for world in (1, 2):
        seen = []
        for rank in range(world):
            mem = TensorLoader(memory.images, memory.labels, 16, seed=3, rank=rank, world_size=world)
            st = stream.loader(16, seed=3, rank=rank, world_size=world)
            assert len(st) == len(mem) == 6
            for (i, x, y), (j, u, v) in zip(mem.indexed_batches(1), st.indexed_batches(1), strict=True):
                assert torch.equal(i, j) and torch.equal(x, u) and torch.equal(y, v)
                seen += j.tolist()
        assert sorted(seen) == list(range(len(files)))
    got = torch.cat([x for x, _ in stream.batches(50)])
    assert torch.equal(got, memory.images)


def test_shard_loader_splits_shards_over_ranks_and_workers(shard_dir):
    """rank x worker reads disjoint shards of each epoch's seeded order (a new order every epoch), every rank
    runs the same number of steps, and one epoch of equal shards reads each sample once."""
    source = ShardSource(shard_dir, "train", workers=2)
    assert len(source) == 96 and source.class_counts() == [32, 32, 32] and source.image_shape == (3, 32, 32)
    orders = []
    for epoch in (0, 1):
        taken = []
        for rank in range(2):
            loader = source.loader(8, seed=5, rank=rank, world_size=2)
            assert len(loader) == 12  # 96 samples / 2 ranks / 4 per rank's batch
            stream = loader.stream(epoch)
            taken += [stream.assigned(w) for w in range(2)]
        assert sorted(s for part in taken for s in part) == list(range(8))
        orders.append(taken)
    assert orders[0] != orders[1]
    keys = []
    for rank in range(2):
        batches = list(source.loader(8, seed=5, rank=rank, world_size=2).indexed_batches(0))
        assert len(batches) == 12 and all(len(k) == 4 and x.shape == (4, 3, 32, 32) for k, x, _ in batches)
        keys += [int(k) for k, _, _ in batches for k in k]
    assert sorted(keys) == list(range(96))
    labels = source.labels
    for k, _, y in source.loader(8, seed=5, workers=0).indexed_batches(0):
        assert torch.equal(labels[k], y)
    with pytest.raises(ValueError, match="8 train shard\\(s\\) for 4 rank\\(s\\) x 4 worker\\(s\\): write smaller shards"):
        source.loader(8, world_size=4, workers=4)  # asked for: refused
    with pytest.warns(UserWarning, match="8 train shard\\(s\\) for 8 rank\\(s\\): reading them with 1 worker\\(s\\) per rank, not 2"):
        fewer = source.loader(8, world_size=8, rank=3)  # the default: as many workers as the shards allow
    assert fewer.workers == 1 and fewer.stream(0).assigned(0) == [fewer.order(0).tolist()[3]]
    with pytest.raises(ValueError, match="8 train shard\\(s\\) for 16 rank\\(s\\): every rank reads shards of its own"):
        source.loader(16, world_size=16)


_CHILD = textwrap.dedent('''
    import json, resource, sys
    from imclass.data.folder import folder_decoder, folder_images
    from imclass.data.source import open_images

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    files = folder_images(sys.argv[1], "all")
    source = open_images(files, folder_decoder((128, 128)), sys.argv[2], workers=1, verbose=False)
    n = 0
    if sys.argv[2] == "stream":
        for _, x, y in source.loader(32, seed=0).indexed_batches(0):
            n += len(x)
    else:
        n = len(source.images)
    print(json.dumps({"images": n, "hwm": status("VmHWM"), "anon": status("RssAnon"),
                      "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))
''')


def _synthetic(root: Path, n: int) -> Path:
    rng = np.random.default_rng(n)
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    for i in range(n):
        small = np.clip(base.astype(int) + rng.integers(-40, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(small).resize((160, 128), Image.BICUBIC).save(root / f"c{i % 2}" / f"{i:05d}.jpg", quality=85)
    return root


def test_stream_memory_is_flat_in_the_number_of_images(tmp_path):
    """A child process streams one epoch of 100 and of 900 photos at 128x128: its peak resident memory
    (VmHWM) and that of its worker grow by less than 12 MB, where holding the images (memory tier) grows by
    the 39 MB the 800 extra images take."""
    small, large = _synthetic(tmp_path / "small", 100), _synthetic(tmp_path / "large", 900)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    jobs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(folder), mode], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
            for folder, mode in ((small, "stream"), (large, "stream"), (small, "memory"), (large, "memory"))]
    results = []
    for job in jobs:  # started together: most of each child's time is importing torch
        out, err = job.communicate(timeout=300)
        assert job.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    s, l, ms, ml = results
    assert (s["images"], l["images"]) == (100, 900)
    assert l["hwm"] - s["hwm"] < 12e6, (s, l)
    assert l["children"] - s["children"] < 12e6, (s, l)
    assert ml["anon"] - ms["anon"] > 35e6, (ms, ml)  # the measurement sees 800 x 49 KB when it is held


class _FreedBlock(torch.utils.data.Dataset):
    """Item 0: how much of a 64 MB block, written and freed in the worker, its RssAnon still holds (MB)."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> int:
        def anon() -> int:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) // 1024

        before = anon()
        block = np.ones(64 << 20, dtype=np.uint8)  # written: every page resident
        del block
        return anon() - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings (Linux)")
def test_stream_workers_return_freed_blocks_even_when_the_parent_keeps_its_own():
    # the parent keeps freed memory (as Classifier.fit does on a CPU), so a forked worker would too
    script = textwrap.dedent("""
        import sys, torch
        from imclass.train.memory import retain_freed_memory
        from imclass.data.stream import worker_loader
        sys.path.insert(0, sys.argv[1])
        from test_stream import _FreedBlock
        assert retain_freed_memory()
        plain = torch.utils.data.DataLoader(_FreedBlock(), batch_size=None, num_workers=1)
        print(next(iter(plain)), next(iter(worker_loader(_FreedBlock(), 1))))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent)], capture_output=True, text=True,
                         check=True).stdout.split()
    kept_plain, kept_ours = int(out[0]), int(out[1])
    assert kept_plain >= 60  # glibc kept the whole block in the worker: the parent's setting, inherited
    assert kept_ours <= 4  # bound_worker_heap: mapped, and unmapped when freed


def test_two_gloo_processes_read_disjoint_files_and_shards(photos, shard_dir, tmp_path):
    """Under torchrun (2 gloo processes) each rank streams its own slice of every global batch of files and its
    own shards: no image is read by both ranks, together they read every image once, in the same steps."""
    out = tmp_path / "seen.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IMCLASS_DIST_TIMEOUT": "60",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "stream_ddp_worker.py"), str(photos), str(shard_dir), str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(out.read_text())
    files0, files1 = seen["files"]
    assert len(files0) == len(files1) == 48 and not set(files0) & set(files1)
    assert sorted(files0 + files1) == list(range(96))
    shards0, shards1 = seen["shards"]
    assert len(shards0) == len(shards1) == 48 and sorted(shards0 + shards1) == list(range(96))
    assert seen["steps"] == [[6, 12], [6, 12]]


def test_shard_source_reads_any_sample_and_trains(shard_dir, tmp_path):
    """A shard folder is a full source: read() seeks to any sample (the bytes the tar holds), the exact plan
    (rows given) gives TensorLoader's batches of the decoded samples, and imclass.data.load / imclass train
    read it in the stream tier (memory refused with the reason)."""
    import imclass.data as imdata
    from imclass.workflows.training import RunConfig, train_from_config

    source = imdata.load(str(shard_dir), "train", verbose=False)
    assert isinstance(source, ShardSource) and source.mode == "stream" and len(source) == 96
    samples = list(sh.ShardSet(shard_dir).samples("train"))
    every = torch.stack([torch.from_numpy(decode_array(s.data, mode="RGB")).permute(2, 0, 1) for s in samples])
    assert torch.equal(source.read([95, 3, 40]), every[[95, 3, 40]])
    rows = torch.arange(0, 96, 2)
    exact = source.loader(8, seed=1, rows=rows, workers=1)
    memory = TensorLoader(every, source.labels, 8, seed=1, rows=rows)
    for (i, x, y), (j, u, v) in zip(memory.indexed_batches(0), exact.indexed_batches(0), strict=True):
        assert torch.equal(i, j) and torch.equal(x, u) and torch.equal(y, v)
    assert torch.equal(torch.cat([x for x, _ in source.batches(40)]), every)
    with pytest.raises(ValueError, match="read in the stream tier \\(--data-mode stream\\), received --data-mode memory"):
        imdata.load(str(shard_dir), "train", mode="memory")
    result = train_from_config(RunConfig(model="mlp", model_options={"hidden": [16]}, dataset=str(shard_dir), epochs=1,
                                         batch_size=16, out=str(tmp_path / "run"), verbose=False))
    assert result["data_mode"] == "stream" and result["train_images"] == 96 and result["test_images"] == 24


def test_features_under_torchrun_each_rank_extracts_its_share(photos, tmp_path):
    """`imclass features` under torchrun (2 gloo processes): each rank extracts half of the 120 photos (its cache
    entry holds 60 rows), rank 0 writes the file, and the file equals one process's."""
    from typer.testing import CliRunner as Runner

    from imclass import models
    from imclass.cli import app
    from imclass.data import load
    from imclass.io import save
    from imclass.train import Classifier

    ds = load(photos, split="all", image_size=32, verbose=False)
    clf = Classifier(models.create("mlp", num_classes=3, hidden=[16]), classes=ds.classes, device="cpu")
    clf.compile("adam", lr=1e-2).fit(ds, epochs=1, batch_size=16, seed=0, verbose=False)
    save(clf, tmp_path / "mlp")
    one = Runner().invoke(app, ["features", str(tmp_path / "mlp"), str(photos), "--out", str(tmp_path / "one.npz"),
                                "--cache", "none", "--amp", "none"])
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IMCLASS_DIST_TIMEOUT": "60",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "imclass",
           "features", str(tmp_path / "mlp"), str(photos), "--out", str(tmp_path / "two.npz"), "--cache",
           str(tmp_path / "cache"), "--amp", "none"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote") == 1  # rank 0 only
    from safetensors.torch import load_file

    shares = sorted(len(load_file(str(p))["features"]) for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert shares == [60, 60]
    with np.load(tmp_path / "one.npz") as a, np.load(tmp_path / "two.npz") as b:
        assert a["features"].shape == (120, 16)
        np.testing.assert_allclose(a["features"], b["features"], atol=1e-5)
        for key in ("labels", "paths", "splits", "classes"):
            assert (a[key] == b[key]).all()
