"""imclass vs Keras 3 (torch backend) on the course's Keras CNN for CIFAR-10, side by side.

The model (the Keras CIFAR-10 example the course uses):
    Conv2D 32 same, Conv2D 32 valid, MaxPool, Dropout .25,
    Conv2D 64 same, Conv2D 64 valid, MaxPool, Dropout .25,
    Flatten, Dense 256 relu, Dropout .5, Dense 10 softmax
trained with batch 32, Adam lr 1e-3, images scaled to [0, 1], no augmentation.

Two modes:
    python bench/keras_cnn.py                  # timed steps (default: 30 warm-up, then 300 timed steps each)
    python bench/keras_cnn.py --epochs 10      # full epochs on all 50,000 images: seconds/epoch + test accuracy

In the timed-steps mode the sides take turns (--rounds turns each) so that a change in the load of
the machine hits both alike; seconds/epoch is extrapolated from the timed steps (1,563 steps of 32
make an epoch) and the test accuracies are those after warm-up + timed steps only: they check that
both learn at the same rate, not the final accuracy (use --epochs for that). Test accuracy is on
the 10,000 official CIFAR-10 test images of the shared data. ``--torch-loop`` adds a third side, a
plain PyTorch training loop on the same model, to tell the engine's overhead from torch's kernels;
imclass uses its engine's default memory format (channels_last, NHWC, for conv models); ``--nchw``
forces ``compile(channels_last=False)``; ``--profile`` prints the torch profiler's table of each side.

Needs keras (`pip install 'keras>=3.3,<4'`, in the `bench` extra). KERAS_BACKEND is set to torch.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "torch")

import sys

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host import full_strength_blas  # noqa: E402

full_strength_blas()  # before numpy/torch load: peers and imclass's own numpy work on the CPU's native BLAS kernel

import numpy as np
import torch

BATCH = 32
LR = 1e-3


def load_cifar(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """CIFAR-10 as the Keras example holds it: uint8 (N, 32, 32, 3) and int labels."""
    with np.load(root / "cifar10" / "cifar10.npz", allow_pickle=False) as z:
        return z["x_train"], z["y_train"].astype(np.int64), z["x_test"], z["y_test"].astype(np.int64)


# --------------------------------------------------------------------------------------------
# Keras


def keras_model():
    import keras
    from keras import layers

    model = keras.Sequential(
        [
            keras.Input((32, 32, 3)),
            layers.Conv2D(32, 3, padding="same", activation="relu"),
            layers.Conv2D(32, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Dropout(0.25),
            layers.Conv2D(64, 3, padding="same", activation="relu"),
            layers.Conv2D(64, 3, activation="relu"),
            layers.MaxPooling2D(),
            layers.Dropout(0.25),
            layers.Flatten(),
            layers.Dense(256, activation="relu"),
            layers.Dropout(0.5),
            layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile(keras.optimizers.Adam(LR), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


class KerasSide:
    """The Keras model and recipe on the images as the Keras example holds them (float32 NHWC in [0, 1])."""

    def __init__(self, x: np.ndarray, y: np.ndarray, seed: int) -> None:
        import keras

        keras.utils.set_random_seed(seed)
        self.x, self.y = x.astype("float32") / 255.0, y
        self.model = keras_model()
        self.name = f"keras {keras.__version__} (torch backend)"

    def train(self, part: slice, epochs: int = 1) -> None:
        self.model.fit(self.x[part], self.y[part], batch_size=BATCH, epochs=epochs, verbose=0, shuffle=True)

    def accuracy(self, xt: np.ndarray, yt: np.ndarray) -> float:
        return float(self.model.evaluate(xt.astype("float32") / 255.0, yt, batch_size=500, verbose=0)[1])


# --------------------------------------------------------------------------------------------
# imclass


def imclass_model():
    """The same network from imclass's registry (written with imclass.layers; softmax kept as logits + softmax)."""
    from imclass import models

    return models.create("keras_cnn", num_classes=10)


class ImclassSide:
    """The same model and recipe with imclass: ``Classifier(...).compile("adam", lr=1e-3).fit(...)``
    on uint8 (N, C, H, W) tensors (scaled to [0, 1] on the device by the engine, inside the step)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, seed: int, channels_last: bool | None = None) -> None:
        from imclass.train import Classifier

        self.name = "imclass" + (" (NCHW)" if channels_last is False else "")
        torch.manual_seed(seed)
        self.x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
        self.y = torch.from_numpy(y)
        self.seed = seed
        # mean 0 / std 1: images only scaled to [0, 1], as the Keras example does
        self.clf = Classifier(imclass_model(), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), device="cpu")
        self.clf.compile("adam", lr=LR, channels_last=channels_last)
        self.calls = 0

    def train(self, part: slice, epochs: int = 1) -> None:
        self.calls += 1  # a new shuffling seed for each call, as Keras reshuffles
        self.clf.fit((self.x[part], self.y[part]), epochs=epochs, batch_size=BATCH, seed=self.seed + self.calls,
                     verbose=False)

    def accuracy(self, xt: np.ndarray, yt: np.ndarray) -> float:
        return float(self.clf.evaluate((xt, yt))["accuracy"])


def timed_steps(sides: list, warmup: int, steps: int, rounds: int) -> dict[str, float]:
    """Seconds per step of each side: warm-up, then ``rounds`` rounds of ``steps / rounds`` steps, the
    sides taking turns in every round so that a change in the machine's load hits both alike."""
    for side in sides:
        side.train(slice(0, warmup * BATCH))
    per_round = max(1, steps // rounds)
    seconds = {side.name: 0.0 for side in sides}
    start = warmup * BATCH
    for r in range(rounds):
        part = slice(start + r * per_round * BATCH, start + (r + 1) * per_round * BATCH)
        for side in sides if r % 2 == 0 else sides[::-1]:
            t0 = time.perf_counter()
            side.train(part)
            seconds[side.name] += time.perf_counter() - t0
    return {name: s / (per_round * rounds) for name, s in seconds.items()}


class TorchLoopSide:
    """A plain PyTorch loop on the same imclass model: the floor an engine can reach with these kernels."""

    name = "plain torch loop"

    def __init__(self, x: np.ndarray, y: np.ndarray, seed: int) -> None:
        torch.manual_seed(seed)
        self.x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)
        self.y = torch.from_numpy(y)
        self.model = imclass_model()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=LR)

    def train(self, part: slice, epochs: int = 1) -> None:
        x, y = self.x[part], self.y[part]
        self.model.train()
        for _ in range(epochs):
            order = torch.randperm(len(x))
            for idx in order.split(BATCH):
                loss = torch.nn.functional.cross_entropy(self.model(x[idx].float() / 255), y[idx])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()

    def accuracy(self, xt: np.ndarray, yt: np.ndarray) -> float:
        self.model.eval()
        with torch.no_grad():
            logits = self.model(torch.from_numpy(xt).permute(0, 3, 1, 2).float() / 255)
        return float((logits.argmax(1) == torch.from_numpy(yt)).double().mean())


def profile_side(side, steps: int = 50) -> str:
    """The torch profiler's table of the ops ``steps`` training steps of a side spend their time in."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        side.train(slice(0, steps * BATCH))
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("IMCLASS_DATA", "../shared/data")))
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps first (timed-steps mode)")
    parser.add_argument("--steps", type=int, default=300, help="timed steps (timed-steps mode)")
    parser.add_argument("--rounds", type=int, default=6, help="the timed steps in this many turns per side")
    parser.add_argument("--epochs", type=int, default=0, help="full epochs instead of timed steps")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=["imclass", "keras"], help="run one side only")
    parser.add_argument("--torch-loop", action="store_true", help="add a plain PyTorch loop on the same model")
    parser.add_argument("--nchw", action="store_true", help="imclass with compile(channels_last=False)")
    parser.add_argument("--profile", action="store_true", help="print the torch profiler table of each (50 steps)")
    args = parser.parse_args()
    if os.environ["KERAS_BACKEND"] != "torch":
        raise SystemExit(f"expected KERAS_BACKEND=torch, received {os.environ['KERAS_BACKEND']!r}")

    torch.set_num_threads(args.threads)
    x, y, xt, yt = load_cifar(args.data)
    if args.epochs:
        mode = f"{args.epochs} full epoch(s) on all {len(x)} training images"
    else:
        mode = (
            f"timed steps: {args.warmup} warm-up + {args.steps} timed steps of {BATCH} in {args.rounds} alternating "
            f"turns; seconds/epoch extrapolated to {math.ceil(len(x) / BATCH)} steps; "
            f"accuracy after {args.warmup + args.steps} steps only (use --epochs N for a full-accuracy run)"
        )
    print(f"Keras CNN on CIFAR-10, batch {BATCH}, Adam {LR}, torch {torch.__version__}, {args.threads} threads")
    print(f"mode: {mode}")
    print(f"test accuracy on the {len(xt)} official test images of the shared data")

    sides = []
    if args.only != "keras":
        sides.append(ImclassSide(x, y, args.seed, channels_last=False if args.nchw else None))
    if args.only != "imclass":
        sides.append(KerasSide(x, y, args.seed))
    if args.torch_loop:
        sides.append(TorchLoopSide(x, y, args.seed))
    steps_per_epoch = math.ceil(len(x) / BATCH)
    if args.epochs:
        per_step = {}
        for side in sides:
            t0 = time.perf_counter()
            side.train(slice(None), epochs=args.epochs)
            per_step[side.name] = (time.perf_counter() - t0) / (args.epochs * steps_per_epoch)
    else:
        per_step = timed_steps(sides, args.warmup, args.steps, args.rounds)
    for side in sides:
        step = per_step[side.name]
        print(
            f"{side.name:>32}: {step * 1000:6.1f} ms/step = {step * steps_per_epoch:6.1f} s/epoch"
            f"   test accuracy {side.accuracy(xt, yt):.4f}"
        )
    if args.only is None:
        a, b = per_step[sides[0].name], per_step[sides[1].name]
        print(f"{'speed ratio':>32}: imclass runs {b / a:.2f}x as fast as Keras")
    if args.profile:
        for side in sides:
            print(f"\n{side.name}, 50 steps, by self CPU time:\n" + profile_side(side))


if __name__ == "__main__":
    main()
