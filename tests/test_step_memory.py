"""What one step of a model takes (imclass.train.memory): counted on the meta device against exact sizes
and against a real step's peak anonymous memory; the tier chooser keeps that room for the model a run
trains; freed memory is not kept under a tight memory limit."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imclass.data.source import ACTIVATION_RESERVE, RESERVE_FACTOR, model_reserve
from imclass.train.memory import ALLOCATOR_FACTOR, RUNTIME_BYTES, activation_reserve, step_tensor_bytes

ROOT = Path(__file__).resolve().parent.parent


def _child(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_inference_step_counts_the_tensors_it_holds_at_once():
    """Conv (8 channels) -> ReLU -> Conv (4) on 2 x 3 x 16 x 16: the peak is the first conv's output (8 KB a
    plane set: 2 x 8 x 256 x 4 = 16,384 B) beside the ReLU's (another 16,384 B); the second conv's output
    (8,192 B) comes once the first conv's output is freed. The model's own weights are neither counted nor moved."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 3, padding=1))
    before = [p.clone() for p in net.parameters()]
    assert step_tensor_bytes(net, (3, 16, 16), 2, training=False) == 2 * 16_384
    assert step_tensor_bytes(net, (3, 16, 16), 4, training=False) == 4 * 16_384  # linear in the batch
    assert all(p.device.type == "cpu" and torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert net.training  # left in the mode it was in


def test_a_training_step_counts_what_backward_keeps_and_the_gradients():
    """A training step holds more than inference: the activations autograd saves and the gradients (of the
    weights too), counted by storage (a gradient kept through a view of its tensor stays counted)."""
    net = torch.nn.Sequential(torch.nn.Linear(100, 50), torch.nn.ReLU(), torch.nn.Linear(50, 10))
    inference = step_tensor_bytes(net, (100,), 8, training=False)
    training = step_tensor_bytes(net, (100,), 8)
    weights = sum(p.numel() * 4 for p in net.parameters())
    assert inference == 8 * 50 * 4 * 2  # the first Linear's output and the ReLU's
    # the peak comes with the first Linear's gradients: every weight's gradient is alive (22,240 B), beside the
    # gradient flowing into that Linear (ReLU's backward: 8 x 50 x 4 B) and the logits, loss and its seed (328 B)
    assert weights == 22_240 and training == weights + 8 * 50 * 4 + (8 * 10 * 4 + 4 + 4)
    assert step_tensor_bytes(net, (100,), 64) > training
    assert all(p.grad is None for p in net.parameters())  # the real weights got no gradient


def test_the_counted_reserve_covers_a_real_training_step():
    """keras_cnn at 64 px, batch 32, Adam, two real steps in a fresh process: the peak anonymous memory they add
    (sampled every millisecond) stays below the reserve counted for it (weights x 4 + the step's tensors x
    ALLOCATOR_FACTOR + RUNTIME_BYTES), and the count is not a loose bound: above a third of it."""
    out = _child("""
        import json, threading, time, torch
        from imclass.models import create
        from imclass.data.source import model_reserve
        from imclass.train.memory import activation_reserve
        def anon():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        torch.set_num_threads(1)
        model = create("keras_cnn", num_classes=10, img_size=64)
        reserve = model_reserve(model, activation_reserve(model, (3, 64, 64), 32))
        x, y = torch.rand(32, 3, 64, 64), torch.randint(0, 10, (32,))
        base, peak, done = anon(), [0], []
        def sample():
            while not done:
                peak[0] = max(peak[0], anon())
                time.sleep(0.001)
        t = threading.Thread(target=sample)
        t.start()
        optimizer = torch.optim.Adam(model.parameters())
        for _ in range(2):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        done.append(1)
        t.join()
        print(json.dumps({"grown": max(peak[0], anon()) - base, "reserve": reserve}))
    """)
    assert 0.33 * out["reserve"] < out["grown"] < out["reserve"], out


def test_model_reserve_takes_the_counted_activations():
    net = torch.nn.Linear(1000, 1000)
    weights = (1000 * 1000 + 1000) * 4
    assert model_reserve(net) == RESERVE_FACTOR * weights + ACTIVATION_RESERVE
    counted = activation_reserve(net, (1000,), 16)
    assert counted == int(ALLOCATOR_FACTOR * step_tensor_bytes(net, (1000,), 16)) + RUNTIME_BYTES
    assert model_reserve(net, counted) == RESERVE_FACTOR * weights + counted


def test_train_keeps_the_counted_room_for_its_model_when_choosing_the_tier(tmp_path):
    """`imclass train --model keras_cnn --image-size 128` says how much it keeps for the model: the reserve
    counted for keras_cnn at 128 px and batch 32 (weights x 4 + activations: 0.91 GB), not the default 0.54 GB
    kept for a model not known yet; a smaller batch keeps less."""
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "photos" / f"c{c}").mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"c{c}" / f"{i}.png")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "IMCLASS_CACHE": str(tmp_path / "state")}

    def kept(batch: int) -> float:
        done = subprocess.run([sys.executable, "-m", "imclass", "train", "--dataset", str(tmp_path / "photos"),
                               "--model", "keras_cnn", "--image-size", "128", "--epochs", "1", "--batch-size", str(batch),
                               "--out", str(tmp_path / f"run{batch}"), "--json"], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        found = re.findall(r"([\d.]+) GB of it kept for the model", done.stderr)
        assert len(found) == 2, done.stderr  # the training and the test split
        return float(found[0])

    from imclass.models import create
    model = create("keras_cnn", num_classes=2, img_size=128)
    expected = model_reserve(model, activation_reserve(model, (3, 128, 128), 32)) / 1e9
    assert abs(kept(32) - expected) < 0.01 and expected > 0.85
    assert kept(8) < expected - 0.2


def test_freed_memory_goes_back_under_a_tight_memory_limit():
    """Under RLIMIT_AS leaving 2 GiB, the process does not keep freed memory (its peaks would add up); without a
    limit it does (the host's free memory, which others move, does not count; a container's own cgroup limit
    under 4 GiB would)."""
    out = _child("""
        import json, resource
        from imclass.data.source import _proc_status, memory_budget
        from imclass.train.memory import limited_memory, retain_freed_memory
        hard = [left for source, left in memory_budget().limits.items() if not source.startswith("host")]
        free = limited_memory()
        size = _proc_status("VmSize") + (2 << 30)
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
        print(json.dumps({"free": free, "contained": bool(hard) and min(hard) < (4 << 30),
                          "limited": limited_memory(), "retained": retain_freed_memory()}))
    """)
    assert out["free"] is out["contained"]  # False on a host without a tight cgroup limit (this project's)
    assert (out["limited"], out["retained"]) == (True, False)
