"""Time-to-accuracy of the fast CIFAR-10 recipe, and the course's Keras CNN for the same wall time.

    python bench/fast.py --target 90 --seeds 0 1 2        # the timed multi-seed run (quiet CPU!)
    python bench/fast.py --target 90 --seeds 0 --no-baseline
    python bench/fast.py --target 94 --seeds 0 1 2 3 4 --device cuda   # GPU: one untimed warm-up run first
    python bench/fast.py --throughput                      # img/s of FastNet widths (engine vs bare loop)
    python bench/fast.py --memory                          # img/s with freed memory kept vs glibc's default (fresh processes)
    python bench/fast.py --amp-ab                          # CPU training img/s: float32 vs bf16 autocast, side by side
    python bench/fast.py --target 90 --amp bf16            # the timed runs under bf16 autocast (CPU or GPU)

Each seed trains ``imclass.workflows.recipes.run_fast_recipe`` on all 50,000 CIFAR-10 training
images and evaluates with TTA on all 10,000 official test images of the shared data: the
"seconds" are wall time of training + evaluation (the data are loaded before the clock
starts). Then the Keras-style CNN (``imclass.models.create("keras_cnn")``, Adam 1e-3, batch 32,
images on [0, 1], no augmentation) is trained by the same engine until the mean wall time of
the fast runs is spent, and evaluated: the ratio of the accuracies is what the recipe buys.
A JSON summary is printed last (and written to ``--json PATH``).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host import full_strength_blas  # noqa: E402

full_strength_blas()  # before numpy/torch load: peers and imclass's own numpy work on the CPU's native BLAS kernel

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from host import LoadGuard, cpu_info, cpu_line, provenance  # noqa: E402
from imclass.data.dataset import ImageDataset  # noqa: E402

# published figure printed beside ours (Keller Jordan, airbench94: 94.01 % mean on the 10,000 test images)
AIRBENCH94 = 0.940

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def load_cifar(root: Path) -> tuple[ImageDataset, ImageDataset]:
    """All 50,000 training images and all 10,000 official test images as ``ImageDataset``s."""
    with np.load(root / "cifar10" / "cifar10.npz", allow_pickle=False) as z:
        def as_ds(x, y, split):
            return ImageDataset(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(),
                                torch.from_numpy(y.astype(np.int64)), list(CLASSES), "cifar10", split)
        return as_ds(z["x_train"], z["y_train"], "train"), as_ds(z["x_test"], z["y_test"], "test")


class TimeBudget:
    """Stop training once ``seconds`` of wall time have passed since the first batch began."""

    order = 100

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start: float | None = None

    def on_train_begin(self, state) -> None:
        self.start = time.perf_counter()

    def on_batch_end(self, state) -> None:
        if time.perf_counter() - self.start >= self.seconds:
            state.stop_training = True


def run_baseline(train: ImageDataset, test: ImageDataset, seconds: float, seed: int = 0, device: str = "cpu") -> dict:
    """The Keras-style CNN trained by the engine (Adam 1e-3, batch 32) for ``seconds`` of wall
    time including its evaluation (the clock covers the same work as the fast runs')."""
    from imclass.models import create
    from imclass.train import Classifier

    if device != "cpu":  # warm up CUDA's kernels for this network too, as the fast runs were
        warm = Classifier(create("keras_cnn"), classes=CLASSES, mean=[0.0] * 3, std=[1.0] * 3, device=device)
        warm.compile("adam", lr=1e-3)
        warm.fit((train.images[:1024], train.labels[:1024]), epochs=1, batch_size=32, verbose=False)
        warm.evaluate(test)
    start = time.perf_counter()
    torch.manual_seed(seed)
    clf = Classifier(create("keras_cnn"), classes=CLASSES, mean=[0.0] * 3, std=[1.0] * 3, device=device)
    clf.compile("adam", lr=1e-3)
    budget = TimeBudget(max(1.0, seconds - min(4.0, 0.1 * seconds)))  # leave time for its evaluation (10,000 images)
    history = clf.fit(train, epochs=1000, batch_size=32, callbacks=[budget], seed=seed, verbose=False)
    metrics = clf.evaluate(test)
    return {"model": "keras_cnn", "accuracy": metrics["accuracy"], "seconds": time.perf_counter() - start,
            "epochs_logged": len(history)}


def bare_step(model: torch.nn.Module):
    """A training step of ``model`` without the engine (Nesterov SGD, label smoothing 0.2):
    the reference the engine's and the memory setting's img/s are read against."""
    import torch.nn.functional as F

    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.85, nesterov=True)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = F.cross_entropy(model(x), y, label_smoothing=0.2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def throughput(widths_list, batch_size: int = 512, images: int = 2048) -> list[dict]:
    """Training img/s of FastNet variants through the engine (``Classifier.fit`` on ``images``
    random images, one epoch after a warm-up epoch) and through a bare loop, back to back."""
    from imclass.models import create
    from imclass.train import Classifier

    rows = []
    x = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (images,))
    for widths, depth, act in widths_list:
        model = create("fastnet", widths=widths, depth=depth, act=act)
        clf = Classifier(model, classes=CLASSES, mean=[0.5] * 3, std=[0.25] * 3, device="cpu")
        clf.compile("sgd", lr=0.01, momentum=0.85, nesterov=True, label_smoothing=0.2, channels_last=True)
        clf.fit((x[:batch_size], y[:batch_size]), epochs=1, batch_size=batch_size, verbose=False)  # warm-up
        t = time.perf_counter()
        clf.fit((x, y), epochs=1, batch_size=batch_size, verbose=False)
        engine = images / (time.perf_counter() - t)
        # bare loop: same model, same batches, no engine
        step = bare_step(model)
        xf = ((x.float() / 255 - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)
        t = time.perf_counter()
        for xb, yb in zip(xf.split(batch_size), y.split(batch_size)):
            step(xb, yb)
        bare = images / (time.perf_counter() - t)
        row = {"widths": list(widths), "depth": depth, "act": act, "batch_size": batch_size,
               "engine_img_s": round(engine, 1), "bare_img_s": round(bare, 1),
               "s_per_epoch_engine": round(50000 / engine, 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def amp_ab(widths_list=((32, 128, 128), (64, 256, 256)), batch_size: int = 500, steps: int = 4, rounds: int = 3) -> list[dict]:
    """CPU training img/s of bare FastNet steps in float32 and under bf16 autocast, alternated in
    rounds on the same model and batch (the median of each side is reported, with the ratio)."""
    import contextlib

    from imclass.models import create
    from imclass.train import cpu_has_native_bf16
    from imclass.train.memory import retain_freed_memory

    retain_freed_memory()
    rows = []
    for widths in widths_list:
        torch.manual_seed(0)
        step = bare_step(create("fastnet", widths=tuple(widths)).to(memory_format=torch.channels_last))
        x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch_size,))
        rates = {"fp32": [], "bf16": []}
        for _ in range(rounds):
            for name in rates:
                ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if name == "bf16" else contextlib.nullcontext
                with ctx():
                    step(x, y)  # settle (oneDNN picks its kernels for this dtype)
                t = time.perf_counter()
                for _ in range(steps):
                    with ctx():
                        step(x, y)
                rates[name].append(steps * batch_size / (time.perf_counter() - t))
        fp32, bf16 = statistics.median(rates["fp32"]), statistics.median(rates["bf16"])
        row = {"widths": list(widths), "batch_size": batch_size, "fp32_img_s": round(fp32, 1),
               "bf16_img_s": round(bf16, 1), "ratio": round(bf16 / fp32, 2), "native_bf16": cpu_has_native_bf16()}
        print(f"fastnet {list(widths)}: float32 {fp32:.1f} img/s, bf16 autocast {bf16:.1f} img/s = {bf16 / fp32:.2f}x",
              flush=True)
        rows.append(row)
    return rows


def _bare_steps(widths, batch_size: int, steps: int, retain: bool) -> float:
    """Training img/s of a bare FastNet loop (one settling step, then ``steps`` timed steps),
    with or without ``imclass.train.memory.retain_freed_memory`` -- run in a fresh process."""
    from imclass.models import create
    from imclass.train.memory import retain_freed_memory

    if retain:
        retain_freed_memory()
    torch.manual_seed(0)
    step = bare_step(create("fastnet", widths=tuple(widths)).to(memory_format=torch.channels_last))
    x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))
    step(x, y)
    t = time.perf_counter()
    for _ in range(steps):
        step(x, y)
    return steps * batch_size / (time.perf_counter() - t)


def memory_ab(widths=(64, 256, 256), batch_size: int = 1000, steps: int = 2, rounds: int = 3) -> dict:
    """Training img/s of a bare FastNet loop with freed memory kept in the heap
    (``imclass.train.memory``) and with glibc's default malloc, alternated in fresh processes:
    a process cannot go back to glibc's default once its heap has grown."""
    import subprocess

    code = ("import sys; sys.path.insert(0, {root!r}); sys.argv = ['fast.py']; import fast; "
            "print(fast._bare_steps({widths!r}, {batch}, {steps}, {retain}))")
    here = str(Path(__file__).resolve().parent)
    rates = {"kept": [], "default": []}
    for _ in range(rounds):
        for name in rates:
            src = code.format(root=here, widths=list(widths), batch=batch_size, steps=steps, retain=name == "kept")
            out = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, check=True)
            rates[name].append(float(out.stdout.strip().splitlines()[-1]))
            print(f"{name}: {rates[name][-1]:.1f} img/s", flush=True)
    kept, default = statistics.median(rates["kept"]), statistics.median(rates["default"])
    row = {"widths": list(widths), "batch_size": batch_size, "kept_img_s": round(kept, 1),
           "default_img_s": round(default, 1), "ratio": round(kept / default, 2)}
    print(f"freed memory kept: {kept:.1f} img/s vs glibc default {default:.1f} img/s = {kept / default:.2f}x", flush=True)
    return row


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=int, default=90, help="90, 94 or 95 (FAST_TARGETS)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=float, default=None, help="override the target's epochs")
    p.add_argument("--widths", type=int, nargs=3, default=None, help="override the target's widths")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--no-baseline", action="store_true", help="skip the Keras-style CNN comparison")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    p.add_argument("--warmup", type=float, default=None,
                   help="epochs of an untimed first run (default: 1 on CUDA, none on CPU), as airbench warms up")
    p.add_argument("--throughput", action="store_true", help="only measure img/s of FastNet widths")
    p.add_argument("--amp", default=None, choices=["auto", "bf16", "none"],
                   help="autocast of the timed runs (default: the recipe's 'auto')")
    p.add_argument("--amp-ab", action="store_true", help="only measure CPU img/s in float32 vs bf16 autocast")
    p.add_argument("--memory", action="store_true", help="only measure img/s with freed memory kept vs not")
    p.add_argument("--data", type=Path, default=None, help="data root (default $IMCLASS_DATA)")
    p.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = p.parse_args(argv)
    guard = LoadGuard(strict=False)  # load average before/after; a busy host marks the figures refused
    if args.threads:
        torch.set_num_threads(args.threads)
    print(cpu_line(), flush=True)
    if args.amp_ab:
        return {"amp_ab": amp_ab(), "threads": torch.get_num_threads(), "cpu": cpu_info()}
    if args.memory:
        return {"memory": memory_ab(), "threads": torch.get_num_threads(), "cpu": cpu_info()}
    if args.throughput:
        variants = [((32, 128, 128), 2, "gelu"), ((32, 128, 128), 2, "relu"), ((32, 128, 128), 1, "gelu"),
                    ((48, 192, 192), 2, "gelu"), ((64, 256, 256), 2, "gelu")]
        rows = throughput(variants)
        return {"throughput": rows, "threads": torch.get_num_threads()}

    from imclass.train.device import resolve_device
    from imclass.workflows.recipes import run_fast_recipe

    root = args.data or Path(os.environ.get("IMCLASS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    train, test = load_cifar(root)
    overrides = {k: v for k, v in {"epochs": args.epochs, "widths": args.widths, "batch_size": args.batch_size}.items()
                 if v is not None}
    if args.compile:
        overrides["compile"] = True
    if args.amp is not None:
        overrides["amp"] = None if args.amp == "none" else args.amp
    device = str(resolve_device(args.device))
    warmup = args.warmup if args.warmup is not None else (1.0 if device.startswith("cuda") else 0.0)
    if warmup > 0:  # CUDA context, cuDNN's kernel choice, compilation: not part of a run's time
        run_fast_recipe(train, test, target=args.target, seed=999, device=device, verbose=False,
                        **{**overrides, "epochs": warmup})
    runs = []
    for seed in args.seeds:
        _, result = run_fast_recipe(train, test, target=args.target, seed=seed, device=device, verbose=False, **overrides)
        cfg = result.pop("config")
        runs.append(result)
        print(f"fast target={args.target} seed={seed}: accuracy {result['accuracy']:.4f} ({len(test):,} test images) "
              f"in {result['seconds']:.1f} s (train {result['train_seconds']:.1f} s + eval {result['eval_seconds']:.1f} s)",
              flush=True)
    accs = [r["accuracy"] for r in runs]
    secs = [r["seconds"] for r in runs]
    summary = {
        "target": args.target,
        "config": cfg,
        "threads": torch.get_num_threads(),
        "host": provenance(guard.before),
        "load": guard.check(),
        "cpu": cpu_info(),
        "test_images": len(test),
        "device": device,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "torch": torch.__version__,
        "warmup_epochs": warmup,
        "runs": runs,
        "accuracy_mean": statistics.mean(accs),
        "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "accuracy_min": min(accs),
        "accuracy_max": max(accs),
        "seconds_mean": statistics.mean(secs),
        "seconds_max": max(secs),
    }
    print(f"fast: {summary['accuracy_mean']:.4f} +/- {summary['accuracy_std']:.4f} (min {min(accs):.4f}, "
          f"max {max(accs):.4f}) over {len(accs)} seeds on {len(test):,} test images, "
          f"{summary['seconds_mean']:.1f} s mean wall time (published airbench94: {AIRBENCH94:.1%})")
    if not args.no_baseline:
        base = run_baseline(train, test, summary["seconds_mean"], device=device)
        summary["baseline"] = base
        summary["accuracy_ratio"] = summary["accuracy_mean"] / base["accuracy"]
        print(f"keras_cnn (Adam 1e-3, batch 32) in the same {base['seconds']:.1f} s: accuracy {base['accuracy']:.4f}; "
              f"ratio fast/keras_cnn = {summary['accuracy_ratio']:.2f}")
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
