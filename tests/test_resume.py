"""Checkpoint/resume: a run killed with SIGKILL at any moment resumes to the exact same result."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from imclass.train import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent

# A small but complete run: dropout (global RNG), augmentation (its generator), SGD momentum,
# a per-batch cosine schedule with warm-up, a validation split, early stopping state, mid-epoch
# checkpoints every 5 steps (16 steps per epoch) and epoch-end ones.
SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np, torch
    from torch import nn
    from imclass.train import Classifier, EarlyStopping

    torch.set_num_threads(1)
    out, ckpt_dir, sleep = sys.argv[1], sys.argv[2], float(sys.argv[3])
    with np.load(sys.argv[4]) as z:
        x, y = z["x_train"][:576], z["y_train"][:576]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Dropout(0.2), nn.Linear(16, 10),
    )

    class Slow:
        def on_batch_end(self, state):
            time.sleep(sleep)

    clf = Classifier(model, device="cpu").compile("sgd", lr=0.05, schedule="cosine", warmup_epochs=1,
                                                  label_smoothing=0.1)
    history = clf.fit((x, y), epochs=5, batch_size=32, validation=1 / 9, augment="crop_flip", seed=11,
                      callbacks=[Slow(), EarlyStopping("val_accuracy", patience=10)], verbose=False,
                      checkpoint_dir=ckpt_dir, checkpoint_every=5, resume=True)
    torch.save({"model": clf.model.state_dict(), "loss": history["loss"], "val_loss": history["val_loss"],
                "epochs": history["epoch"]}, out)
    """
)


def _run(script, out, ckpt_dir, sleep, npz, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(script), str(out), str(ckpt_dir), str(sleep), str(npz)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


def _wait_for_change(path: Path, proc, previous: float | None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.stat().st_mtime_ns != previous:
            return
        if proc.poll() is not None:
            pytest.fail(f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    pytest.fail("no checkpoint appeared in time")


@pytest.mark.slow
def test_kill_9_twice_then_resume_matches_an_uninterrupted_run(tmp_path, data_root):
    npz = data_root / "cifar10" / "cifar10.npz"
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)

    reference = _run(script, tmp_path / "ref.pt", tmp_path / "ref_ckpt", 0.0, npz)  # runs alongside the killed ones

    ckpt_dir = tmp_path / "ckpt"
    ckpt = ckpt_dir / "checkpoint.pt"
    previous = None
    for kill_delay in (0.0, 0.17):  # right after a checkpoint appears, then at an arbitrary later moment
        proc = _run(script, tmp_path / "out.pt", ckpt_dir, 0.03, npz)
        _wait_for_change(ckpt, proc, previous)
        time.sleep(kill_delay)
        assert proc.poll() is None, "the run finished before the kill"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL
        saved = load_checkpoint(ckpt)  # whatever the moment of the kill, the file is whole
        assert not saved["finished"]
        previous = ckpt.stat().st_mtime_ns
    assert not (tmp_path / "out.pt").exists()

    resumed = _run(script, tmp_path / "out.pt", ckpt_dir, 0.0, npz)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-2000:]

    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["epochs"] == ref["epochs"] == [1, 2, 3, 4, 5]
    assert out["loss"] == ref["loss"] and out["val_loss"] == ref["val_loss"]
    for key, value in ref["model"].items():
        assert torch.equal(out["model"][key], value), key


def test_checkpoint_is_written_atomically_and_read_weights_only(tmp_path):
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    (path.parent / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint from a killed run")
    save_checkpoint(path, {"model": {"w": torch.arange(3.0)}, "epoch": 2, "history": {"loss": [1.0, 0.5]}})
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"]  # no temporary file left, stale ones gone
    loaded = load_checkpoint(path.parent)
    assert loaded["epoch"] == 2 and torch.equal(loaded["model"]["w"], torch.arange(3.0))
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read training checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        load_checkpoint(tmp_path / "missing")


def test_resume_with_other_batch_size_is_refused(tmp_path, cifar_small):
    from torch import nn

    from imclass.train import Classifier

    x, y, _, _ = cifar_small
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    Classifier(model).compile("sgd", lr=0.01).fit((x[:64], y[:64]), epochs=1, batch_size=16, checkpoint_dir=tmp_path,
                                                   verbose=False)
    clf = Classifier(model).compile("sgd", lr=0.01)
    with pytest.raises(ValueError, match="batches of 16, received 64 images in batches of 32"):
        clf.fit((x[:64], y[:64]), epochs=2, batch_size=32, checkpoint_dir=tmp_path, resume=True, verbose=False)
    # resuming a finished run returns its history without training more
    h = clf.fit((x[:64], y[:64]), epochs=1, batch_size=16, checkpoint_dir=tmp_path, resume=True, verbose=False)
    assert h["epoch"] == [1]


def test_interrupted_in_process_run_resumes_from_a_mid_epoch_checkpoint(tmp_path, cifar_small):
    from torch import nn

    from imclass.train import Classifier

    x, y, _, _ = cifar_small
    data = (x[:160], y[:160])  # 5 steps per epoch

    def run(ckpt_dir, callbacks=(), resume=False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3), nn.Linear(256, 10))
        clf = Classifier(model).compile("adam", lr=3e-3, schedule="onecycle")
        h = clf.fit(data, epochs=3, batch_size=32, augment="crop_flip", seed=5, checkpoint_dir=ckpt_dir,
                    checkpoint_every=3, resume=resume, callbacks=callbacks, verbose=False)
        return clf.model.state_dict(), h

    class Crash:
        def on_batch_end(self, state):
            if state.step == 8:  # after the mid-epoch checkpoint at step 6 (epoch 2, batch 1)
                raise KeyboardInterrupt

    ref_weights, ref_history = run(tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", [Crash()])
    saved = load_checkpoint(tmp_path / "run")
    assert (saved["epoch"], saved["batch"], saved["step"]) == (1, 1, 6)
    weights, history = run(tmp_path / "run", resume=True)
    assert history["loss"] == ref_history["loss"] and history["accuracy"] == ref_history["accuracy"]
    assert all(torch.equal(weights[k], v) for k, v in ref_weights.items())
