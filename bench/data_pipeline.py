"""How much of a training step goes to loading and augmenting the batch (CPU).

For the Keras CIFAR-10 CNN (``imclass.models.create("keras_cnn")``) at batch 32 and 128:
  pipeline = index gather of a uint8 batch from the in-memory training set + uint8 -> float
             + normalisation + random crop (reflect padding 4) + horizontal flip;
  step     = the same pipeline plus forward, backward and an SGD step (``Classifier._train_step``).
Median (and minimum) over repeated batches after a warm-up, with one torch thread by default
(the machine is shared; pass a thread count as first argument to change it).
Run:  .venv/bin/python bench/data_pipeline.py [threads]
"""
from __future__ import annotations

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

from imclass.data.augment import CropFlip
from imclass.data.loader import TensorLoader
from imclass.models import create
from imclass.train import Classifier


def time_ms(fn, repeats: int) -> tuple[float, float]:
    """(median, minimum) wall time of ``fn`` in milliseconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times), 1000 * min(times)


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    root = Path(os.environ.get("IMCLASS_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    with np.load(root / "cifar10" / "cifar10.npz") as z:
        images = torch.from_numpy(z["x_train"]).permute(0, 3, 1, 2).contiguous()  # (50000, 3, 32, 32) uint8
        labels = torch.from_numpy(z["y_train"].astype(np.int64))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores")
    augment = CropFlip(padding=4, mode="reflect")
    for batch_size in (32, 128):
        torch.manual_seed(0)
        clf = Classifier(create("keras_cnn"), mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26], device="cpu")
        clf.compile("sgd", lr=0.01)
        clf.classes = [str(i) for i in range(10)]
        loader = TensorLoader(images, labels, batch_size, seed=0)
        batches = loader.batches(0)
        gen = torch.Generator().manual_seed(0)

        def pipeline():
            xb, _ = next(batches)
            return augment(clf._normalise(xb), gen, 0)

        def step():
            xb, yb = next(batches)
            clf._train_step(xb, yb, augment, gen, 0)

        clf.model.train()
        for _ in range(5):
            step()
        (t_pipe, min_pipe), (t_step, min_step) = time_ms(pipeline, 200), time_ms(step, 30)
        print(f"batch {batch_size:4d}: pipeline {t_pipe:6.2f} ms (min {min_pipe:5.2f}), "
              f"full step {t_step:7.1f} ms (min {min_step:6.1f}) -> loading + augmentation = "
              f"{100 * t_pipe / t_step:4.1f}% of a step (median; {100 * min_pipe / min_step:4.1f}% by minimum), "
              f"pipeline alone {batch_size / t_pipe * 1000:,.0f} img/s")


if __name__ == "__main__":
    main()
