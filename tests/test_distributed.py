"""Distributed training on CPU: 2 gloo processes under torchrun against one process (tests/ddp_worker.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imclass.data.loader import TensorLoader

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _worker():
    spec = importlib.util.spec_from_file_location("ddp_worker", ROOT / "tests" / "ddp_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IMCLASS_DIST_TIMEOUT": "60", **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _start(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(TORCHRUN + args, cwd=ROOT, env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait(job: subprocess.Popen, timeout: float = 240) -> subprocess.CompletedProcess:
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        out, err = job.communicate()
        pytest.fail(f"torchrun still running after {timeout} s: {err[-2000:]}")
    return subprocess.CompletedProcess(job.args, job.returncode, out, err)


def _torchrun(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return _wait(_start(args, **env))


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, cifar_small):
    """The module's torchrun jobs, started together (most of their time is starting Python and torch);
    the CLI one trains on a user's folder of real CIFAR-10 photos (3 classes x 40 PNGs)."""
    from PIL import Image

    base = tmp_path_factory.mktemp("ddp")
    dirs = {name: base / name for name in ("ddp", "bf16", "killed", "run", "cache")}
    for d in dirs.values():
        d.mkdir()
    x, y, _, _ = cifar_small
    for c, name in enumerate(["airplane", "automobile", "bird"]):
        (dirs["run"] / "photos" / name).mkdir(parents=True)
        for i in torch.nonzero(y == c).flatten()[:40].tolist():
            Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(dirs["run"] / "photos" / name / f"{i}.png")
    started = {
        "ddp": _start(["tests/ddp_worker.py", str(dirs["ddp"])]),
        "bf16": _start(["tests/ddp_worker.py", str(dirs["bf16"]), "--amp", "bf16"]),
        "killed": _start(["tests/ddp_worker.py", str(dirs["killed"]), "--kill-rank", "1", "--kill-step", "3"]),
        "run": _start(["-m", "imclass", "train", "--model", "mlp", "--dataset", str(dirs["run"] / "photos"),
                       "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.25", "--device", "cpu",
                       "--out", str(dirs["run"] / "out"), "--json"]),
        "cache": _start(["-m", "imclass", "train", "--model", "mlp", "--dataset", str(dirs["run"] / "photos"),
                         "--epochs", "1", "--batch-size", "16", "--val-fraction", "0.25", "--device", "cpu",
                         "--out", str(dirs["cache"] / "out"), "--json", "--data-mode", "cache"],
                        IMCLASS_CACHE=str(dirs["cache"] / "state")),
    }
    yield {name: (job, dirs[name]) for name, job in started.items()}
    for job in started.values():
        if job.poll() is None:
            job.kill()
            job.communicate()


def test_loader_gives_each_rank_its_slice_of_every_global_batch():
    images = torch.arange(23, dtype=torch.uint8).view(23, 1, 1, 1).expand(23, 1, 2, 2).contiguous()
    labels = torch.arange(23)
    single = TensorLoader(images, labels, batch_size=8, seed=5)
    ranks = [TensorLoader(images, labels, batch_size=8, seed=5, rank=r, world_size=3) for r in range(3)]
    assert len(single) == 3 and all(len(r) == 3 for r in ranks)  # 23 = 8 + 8 + 7: the last batch is split 3/2/2
    for whole, *parts in zip(single.indexed_batches(1), *(r.indexed_batches(1) for r in ranks)):
        assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
        assert torch.equal(torch.cat([p[2] for p in parts]), whole[2])
    assert [len(p[0]) for p in list(zip(*(r.indexed_batches(0) for r in ranks)))[-1]] == [3, 2, 2]
    assert ranks[0].global_batch_len(2) == 7
    # a last global batch smaller than the number of ranks cannot be split: it is dropped
    assert len(TensorLoader(images[:18], labels[:18], batch_size=8, rank=0, world_size=2)) == 3  # 8 + 8 + 2
    assert len(TensorLoader(images[:17], labels[:17], batch_size=8, rank=0, world_size=2)) == 2  # 8 + 8 (+ 1)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        TensorLoader(images, labels, rank=2, world_size=2)


def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(tmp_path, jobs):
    worker = _worker()
    one_out, longer_out = tmp_path / "one", tmp_path / "one3"
    torch.set_num_threads(1)
    one = worker.train(one_out)  # while the 2-process run goes on
    job, dist_out = jobs["ddp"]
    run = _wait(job)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(dist_out / "weights.pt", weights_only=True)
    for name, ref in one.model.state_dict().items():
        torch.testing.assert_close(got[name], ref, atol=1e-5, rtol=1e-4, msg=f"{name} differs")
    history = torch.load(dist_out / "history.pt", weights_only=True)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):  # metrics reduced over both ranks
        assert history[key] == pytest.approx(one.history[key], rel=1e-5), key
    assert sorted(p.name for p in dist_out.iterdir()) == ["checkpoint.pt", "history.pt", "weights.pt"]

    # the checkpoint written by rank 0 resumes in one process, like a one-process run of 3 epochs
    resumed = worker.train(dist_out, epochs=3, resume=True)
    longer = worker.train(longer_out, epochs=3)
    assert resumed.history["epoch"] == [1, 2, 3]
    for name, ref in longer.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], ref, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_under_two_processes_trains_like_one(tmp_path, jobs):
    """Mixed precision in distributed mode (CPU: bf16 autocast; the gradients DDP averages stay float32)."""
    worker = _worker()
    torch.set_num_threads(1)
    one = worker.train(tmp_path / "one", amp="bf16")
    fp32 = worker.train(tmp_path / "fp32")
    job, dist_out = jobs["bf16"]
    run = _wait(job)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(dist_out / "weights.pt", weights_only=True)
    # bf16 rounds each half-batch's products alike, but the two ranks sum fewer terms: agreement to
    # bf16's precision, and closer to the one-process bf16 run than bf16 is to float32
    largest_gap = lambda a, b: max(float((a[k] - v).abs().max()) for k, v in b.items())
    gap_one = largest_gap(got, one.model.state_dict())
    gap_fp32 = largest_gap(fp32.model.state_dict(), one.model.state_dict())
    # the documented bound (docs/distributed.md): within 0.005 of one bf16 process (bf16 vs float32: about 0.065)
    assert gap_one < 5e-3 and gap_one < gap_fp32 / 5, (gap_one, gap_fp32)
    history = torch.load(dist_out / "history.pt", weights_only=True)
    assert history["val_accuracy"] == pytest.approx(one.history["val_accuracy"], abs=0.04)
    assert history["loss"] == pytest.approx(one.history["loss"], rel=2e-2)


def test_a_killed_rank_ends_the_job_with_an_error_instead_of_hanging(jobs):
    job, out = jobs["killed"]
    run = _wait(job, timeout=240)  # gloo's timeout is 60 s (IMCLASS_DIST_TIMEOUT): never reached, torchrun ends it
    assert run.returncode != 0
    assert "ChildFailedError" in run.stderr and "Signal 9 (SIGKILL) received by PID" in run.stderr
    assert "rank      : 1" in run.stderr  # the root cause names the killed rank
    assert not (out / "weights.pt").exists()


def test_torchrun_cli_train_writes_one_run_folder_and_predict_shards(tmp_path, jobs):
    import imclass

    job, folder = jobs["run"]
    out = folder / "out"
    run = _wait(job)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 reports for both
    result = json.loads(lines[0])
    assert result["train_images"] == 96 and result["test_images"] == 24 and result["epochs"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["best.safetensors", "checkpoint.pt", "config.json",
                                                     "confusion_matrix.png", "curves.png", "history.csv",
                                                     "last.safetensors", "model.safetensors"]
    assert len((out / "history.csv").read_text().splitlines()) == 2  # one header, one epoch: one writer
    clf = imclass.load(out)
    test = imclass.data.load(str(folder / "photos"), split="test")
    assert clf.evaluate(test)["accuracy"] == pytest.approx(result["accuracy"])

    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(images / f"{i}.png")
    (images / "broken.png").write_bytes(b"not a png")
    run = _torchrun(["-m", "imclass", "predict", str(out), str(images), "--format", "json"])
    assert run.returncode != 0  # the unreadable file is reported (exit code 1), the others predicted
    report = json.loads([line for line in run.stdout.splitlines() if line.startswith("{")][0])
    assert [Path(r["image"]).name for r in report["predictions"]] == [f"{i}.png" for i in range(5)]
    assert [Path(e["image"]).name for e in report["errors"]] == ["broken.png"]
    expected = clf.predict_proba(test.images[:5])
    for row, probs in zip(report["predictions"], expected):
        top = row["top"][0]
        assert top["class"] == clf.classes[int(probs.argmax())]
        assert top["probability"] == pytest.approx(float(probs.max()), abs=1e-4)


def test_torchrun_cache_tier_builds_one_shared_cache_and_trains_exactly_like_the_memory_tier(jobs):
    """2 ranks build the cache together (rank r decodes files r, r + 2, ...), map the one file, each
    reading its part of every global batch: the same weights, bit for bit, as 2 ranks in memory."""
    from safetensors.torch import load_file

    job, folder = jobs["cache"]
    done = _wait(job)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][0])
    assert result["data_mode"] == "cache" and result["train_images"] == 96
    manifests = sorted((folder / "state" / "images").glob("*.json"))
    assert len(manifests) == 2 and sorted(json.loads(m.read_text())["n"] for m in manifests) == [24, 96]
    assert done.stderr.count("-> cache tier") == 2  # said once per split, by rank 0
    memory_job, memory_folder = jobs["run"]
    assert _wait(memory_job).returncode == 0
    cached, in_memory = load_file(folder / "out" / "model.safetensors"), load_file(memory_folder / "out" / "model.safetensors")
    assert cached.keys() == in_memory.keys() and all(torch.equal(cached[k], in_memory[k]) for k in cached)
