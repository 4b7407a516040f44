"""Training throughput of 1 process against 2 gloo processes (DDP under torchrun) on this machine's CPU.

    python bench/distributed.py                      # keras_cnn, global batch 128, 2,048 CIFAR-10-sized images
    python bench/distributed.py --model mlp --images 8192 --epochs 3 --json bench/distributed.json

Each side runs ``torchrun --standalone --nproc_per_node=N bench/distributed.py --worker`` and trains
through ``Classifier.fit`` with the same seed and global batch. Sides, run in turn (``--rounds``):
one process with T threads (T = the cores given to the run, default 2), and N=2 processes with T/2
threads each, so both use the same cores. Images/s is the training images of the last epochs over
their wall time (the first epoch is a warm-up). The images are seeded random pixels of CIFAR-10's
shape (3x32x32, 10 classes): speed does not depend on their content, and no data set load is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from host import full_strength_blas  # noqa: E402

full_strength_blas()  # before numpy/torch load: imclass's own numpy work on the CPU's native BLAS kernel


def worker(args: argparse.Namespace) -> None:
    """One rank: train, and (rank 0) write the epoch times to ``args.result``."""
    import torch

    from imclass import models
    from imclass.train import Classifier, distributed

    torch.set_num_threads(args.threads)
    with distributed.session("cpu"):
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (args.images, 3, 32, 32), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (args.images,), generator=g)
        torch.manual_seed(0)
        model = models.create(args.model, num_classes=10, in_chans=3, img_size=32)
        clf = Classifier(model, device="cpu", mean=[0.5] * 3, std=[0.25] * 3).compile("sgd", lr=0.01)
        history = clf.fit((images, labels), epochs=args.epochs, batch_size=args.batch_size, seed=0, verbose=False)
        if distributed.is_main():
            Path(args.result).write_text(json.dumps({"seconds": history["seconds"], "loss": history["loss"]}))


def run_side(args: argparse.Namespace, procs: int, threads: int) -> dict:
    """Launch one side under torchrun; returns its epoch seconds and images/s."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
               str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--model", args.model,
               "--images", str(args.images), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--result", str(result)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0:
            raise SystemExit(f"torchrun with {procs} process(es) failed:\n{done.stderr[-3000:]}")
        figures = json.loads(result.read_text())
    timed = figures["seconds"][1:]  # the first epoch warms up
    return {"procs": procs, "threads": threads, "epoch_seconds": figures["seconds"],
            "images_per_s": args.images * len(timed) / sum(timed), "final_loss": figures["loss"][-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="keras_cnn")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch size")
    parser.add_argument("--cores", type=int, default=2, help="threads of the 1-process side (2 processes get half each)")
    parser.add_argument("--rounds", type=int, default=2, help="turns of each side")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from host import LoadGuard, cpu_info, cpu_line, provenance

    guard = LoadGuard(strict=False)  # load average before/after; a busy host marks the figures refused

    print(cpu_line())
    print(f"{args.model}, {args.images:,} images 3x32x32, global batch {args.batch_size}, {args.epochs} epochs "
          f"(first = warm-up), {args.rounds} rounds")
    sides = {"1 process": (1, args.cores), "2 processes": (2, max(1, args.cores // 2))}
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, (procs, threads) in sides.items():
            runs[name].append(run_side(args, procs, threads))
    median = {name: statistics.median(r["images_per_s"] for r in rs) for name, rs in runs.items()}
    for name, rs in runs.items():
        rounds = ", ".join(f"{r['images_per_s']:.1f}" for r in rs)
        print(f"{name:12s} ({sides[name][1]} thread(s) each): {median[name]:8.1f} img/s  (rounds: {rounds})")
    ratio = median["2 processes"] / median["1 process"]
    print(f"2 processes / 1 process: {ratio:.2f}x")
    losses = {name: rs[0]["final_loss"] for name, rs in runs.items()}
    print(f"final training loss: 1 process {losses['1 process']:.5f}, 2 processes {losses['2 processes']:.5f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": provenance(guard.before), "load": guard.check(), "cpu": cpu_info(), "args": vars(args), "runs": runs,
                                               "median_images_per_s": median, "ratio_2_over_1": ratio}, indent=2))


if __name__ == "__main__":
    main()
